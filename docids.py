"""DocID format rules (PAPER.md 1.2): a normaliser for generated DocIDs and a built-in extractive
teacher that writes DocIDs from a document's own terms when no teacher file (e.g. GPT-4o) is given.

Rules: 6-8 lowercase words, 3-5 core terms from the document ordered by importance, letters,
digits and spaces only but special terms kept (pd3.1, c++), no articles, linking or auxiliary verbs.
"""
import math
import re
from collections import Counter

MIN_WORDS, MAX_WORDS = 6, 8

# Articles, linking and auxiliary verbs: never part of a DocID.
BANNED = frozenset("""a an the is are was were be been being am do does did done has have had having
will would shall should can could may might must seem seems seemed become becomes became""".split())

STOPWORDS = BANNED | frozenset("""about above after again against all also and any as at because before
below between both but by each few for from further here how if in into it its itself just more most no
nor not now of off on once only or other our out over own same so some such than that their them then
there these they this those through to too under until up very what when where which while who whom why
with you your we he she his her i me my us one two use used using uses return returns value values
self cls none true false def class import raise pass else elif try except finally lambda yield args
kwargs given new object function method instance default optional otherwise string str int bool list
dict tuple""".split())

_SPECIAL_EDGE = "._-/"
_TOKEN = re.compile(r"[A-Za-z0-9]+")
_CAMEL = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+[0-9]*|[A-Z]+[0-9]*|[0-9]+")


def normalize_docid(text, fill_terms=(), min_words=MIN_WORDS, max_words=MAX_WORDS, doc=None):
    """Apply the DocID format rules to a generated DocID.

    Lowercases, keeps the first line, removes characters outside letters, digits, spaces and the
    inner symbols of special terms, drops articles / linking / auxiliary verbs and repeats, and cuts
    to `max_words`. With `doc`, words that cannot be derived from the document (rule 6) are
    dropped too. A DocID shorter than `min_words` is filled from `fill_terms` (the document's own
    terms, most important first).
    """
    allowed = derivable(doc) if doc is not None else None
    lines = str(text).strip().lower().splitlines()
    line = lines[0] if lines else ""
    line = re.sub(r"[^a-z0-9._+#/\- ]", " ", line)
    words = []
    for token in line.split():
        token = token.strip(_SPECIAL_EDGE)
        if token and token not in BANNED and token not in words and (allowed is None or _from_doc(token, allowed)):
            words.append(token)
    for term in fill_terms:
        if len(words) >= min_words:
            break
        if term not in words and term not in BANNED:
            words.append(term)
    return " ".join(words[:max_words])


def derivable(doc):
    """The words a DocID of `doc` may use: its terms and its lowercased whitespace tokens."""
    return set(terms(doc)) | {t.strip(_SPECIAL_EDGE + ",;:()[]{}'\"") for t in doc.lower().split()}


def _from_doc(word, allowed):
    return word in allowed or all(part in allowed for part in terms(word))


def terms(text):
    """Lowercase word terms of a text, identifiers split at underscores, dots and camelCase."""
    return [part.lower() for token in _TOKEN.findall(text) for part in _CAMEL.findall(token)]


class ExtractiveTeacher:
    """DocIDs made of a document's most distinctive terms (tf-idf with a bonus for early terms),
    written in the order they first appear, so a title or qualified name leads."""

    def __init__(self, docs, lead_terms=16):
        self.lead_terms = lead_terms
        df = Counter()
        for doc in docs:
            df.update(set(self._content_terms(doc)))
        self.df, self.n_docs = df, max(len(docs), 1)

    @staticmethod
    def _content_terms(doc):
        return [t for t in terms(doc) if t not in STOPWORDS and len(t) > 1]

    def ranked_terms(self, doc):
        """The document's distinct content terms, most important first."""
        words = self._content_terms(doc)
        first, tf = {}, Counter(words)
        for pos, word in enumerate(words):
            first.setdefault(word, pos)
        def score(word):
            idf = math.log((self.n_docs + 1) / (self.df.get(word, 0) + 1)) + 1.0
            return (1 + math.log(tf[word])) * idf * (2.0 if first[word] < self.lead_terms else 1.0)
        return sorted(tf, key=lambda w: (-score(w), first[w]))

    def docid(self, doc, n_words=MAX_WORDS):
        ranked = self.ranked_terms(doc)
        chosen = set(ranked[:n_words])
        ordered = [w for w in dict.fromkeys(self._content_terms(doc)) if w in chosen]
        return normalize_docid(" ".join(ordered), fill_terms=ranked)
