"""Every prompt of the pipeline, in one place: each SFT script and its generation script use the same text.

Wording is this project's own; the content follows the paper (PAPER.md 1.2, 1.3, 1.4).
"""

GENERIC_INSTRUCTION = "Retrieve the documents that are relevant to the given query."
# Added for an instruct model used without fine-tuning (ZERO_SHOT in qg_vllm.py / title_vllm.py),
# which otherwise tends to answer with a preamble.
REPLY_ONLY = {"query": "\n\nReply with the query only, on one line.", "docid": "\n\nReply with the phrase only."}


def query_generation_prompt(instruction, doc, zero_shot=False):
    """Query generator (sftqg.py, qg_vllm.py): write a query for `doc` under a task instruction."""
    return ("You turn documents into search queries.\n"
            f"Retrieval task: {instruction}\n\n"
            "Write one search query, for this task, that the following document answers:\n\n"
            f"{doc}" + (REPLY_ONLY["query"] if zero_shot else ""))


DOCID_RULES = """Write a short identifier phrase (a DocID) for the document below, following these rules:
1. Length: 6 to 8 words.
2. Take 3 to 5 core terms directly from the document.
3. Order the terms by importance, from general to specific.
4. Use lowercase letters, digits and spaces only, but keep special terms as written (for example pd3.1).
5. No articles, no linking or auxiliary verbs, no verbs at all: nouns and adjectives only.
6. Every term must come from the document; the phrase should single this document out."""


def docid_prompt(doc, rules=DOCID_RULES, zero_shot=False):
    """DocID generator (sftid.py, title_vllm.py): the format rules, then the document."""
    return f"{rules}\n\nDocument:\n{doc}" + (REPLY_ONLY["docid"] if zero_shot else "")


def retrieval_prompt(instruction, query):
    """Generative retriever (genir.py): the task instruction, a newline, the query."""
    return f"{instruction}\n{query}" if instruction else query
