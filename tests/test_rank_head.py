"""The ranking head learns (issue 12): trained with the ranking loss on a small corpus, it puts the
positive above its BM25 negatives on most held-out groups, far above chance."""
import random

import torch

import bm25
import lm
import mair_config as mc
import ranking
from docids import ExtractiveTeacher
from file_io import read_jsonl
from prompts import retrieval_prompt

N_DOCS, GROUP_SIZE, GROUPS_PER_STEP, STEPS, WORDS, LEAD = 48, 4, 8, 300, 8, 16
INSTRUCTION = "Find the documentation entry of the standard-library function."


class Corpus:
    """Documents of a training task with teacher DocIDs; a query is a passage of WORDS words from a
    document's first LEAD words (where its DocID's terms are), starting at an even word in training and
    at an odd one in held-out groups (so no held-out query was trained on); its group is the document
    and GROUP_SIZE - 1 of the query's BM25 top documents."""

    def __init__(self, demo_root):
        rows = [d for d in read_jsonl(mc.docs_path("PyDoc-Sys", demo_root)) if len(d["doc"].split()) >= LEAD]
        self.docs = rows[:N_DOCS]
        teacher = ExtractiveTeacher([d["doc"] for d in self.docs])
        self.gists = [teacher.docid(d["doc"]) for d in self.docs]
        self.index = bm25.BM25Index(self.docs, "english", True)

    def group(self, i, rng, held_out=False):
        """(query, [positive, negatives...]) as corpus positions."""
        words = self.docs[i]["doc"].split()[:LEAD]
        start = rng.randrange(int(held_out), len(words) - WORDS + 1, 2)
        query = " ".join(words[start:start + WORDS])
        top = [j for j in self.index.search_indices([query], 20)[0].tolist() if j != i]
        rest = [j for j in range(len(self.docs)) if j != i and j not in top]
        return query, [i] + (top + rng.sample(rest, len(rest)))[:GROUP_SIZE - 1]


def encode_group(tokenizer, corpus, query, members):
    prompt = retrieval_prompt(INSTRUCTION, query)
    return [lm.encode_example(tokenizer, prompt, corpus.gists[j], 128) for j in members]


def positive_first_share(model, tokenizer, corpus, groups, token_id):
    """Share of groups whose positive the reranker (ranking.rerank) puts first; the positive is listed
    last, so a tie does not favour it."""
    prompts = [lm.chat_prompt_ids(tokenizer, retrieval_prompt(INSTRUCTION, q)) for q, _ in groups]
    candidates = [members[1:] + members[:1] for _, members in groups]
    ranked = ranking.rerank(model, tokenizer, prompts, candidates, corpus.gists, token_id, 64, progress=False)
    return sum(order[0] == members[0] for order, (_, members) in zip(ranked, groups)) / len(groups)


def test_ranking_head_ranks_positives_above_bm25_negatives_on_held_out_groups(demo_root, tiny_model_path):
    torch.manual_seed(0)
    corpus = Corpus(demo_root)
    model, tokenizer = lm.load_model(tiny_model_path, device="cpu")
    token_id = ranking.rank_token_id(tokenizer, "<|reserved_special_token_0|>", model)
    rng = random.Random(0)
    held_out = [corpus.group(i, rng, held_out=True) for i in range(N_DOCS)]
    trained = set()
    before = positive_first_share(model, tokenizer, corpus, held_out, token_id)

    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    model.train()
    for _ in range(STEPS):  # the "joint" ranking mode: LM loss on the positives plus RankNet on the groups
        groups = [corpus.group(rng.randrange(N_DOCS), rng) for _ in range(GROUPS_PER_STEP)]
        trained.update(q for q, _ in groups)
        examples = [e for q, m in groups for e in encode_group(tokenizer, corpus, q, m)]
        batch = lm.collate(examples, tokenizer.pad_token_id)
        positives = lm.collate(examples[::GROUP_SIZE], tokenizer.pad_token_id)
        loss = ranking.ranknet_loss(model, {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                                            "token_id": token_id, "group_size": GROUP_SIZE})
        loss = loss + model(**positives).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    after = positive_first_share(model, tokenizer, corpus, held_out, token_id)
    chance = 1 / GROUP_SIZE
    assert not trained & {q for q, _ in held_out}
    assert before < chance + 0.15, before
    assert after >= 0.6 and after >= chance + 0.3, (before, after, len(held_out))
