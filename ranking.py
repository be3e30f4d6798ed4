"""The ranking head of the retriever: the ranking token's logit after [query -> DocID], its RankNet
training loss, and the reranking of generated candidates by that logit."""
import logging

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

import decoding
import lm

log = logging.getLogger("ranking")


def rank_token_id(tokenizer, token, model=None):
    """Id of the ranking token, added to the vocabulary (and the model resized) if missing."""
    if token not in tokenizer.get_vocab():
        tokenizer.add_special_tokens({"additional_special_tokens": [token]})
        if model is not None:
            model.resize_token_embeddings(len(tokenizer))
        log.info("added the ranking token %s to the vocabulary", token)
    return tokenizer.convert_tokens_to_ids(token)


def rank_scores(model, input_ids, attention_mask, token_id):
    """Logit of the ranking token at each right-padded sequence's last position."""
    hidden = model.get_decoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
    last = hidden[torch.arange(len(input_ids), device=hidden.device), attention_mask.sum(1) - 1]
    return (last @ model.get_output_embeddings().weight[token_id]).float()


def ranknet_loss(model, batch):
    """RankNet: each group's positive (first) above each of its negatives."""
    scores = rank_scores(model, batch["input_ids"], batch["attention_mask"], batch["token_id"])
    groups = scores.view(-1, batch["group_size"])
    return F.softplus(groups[:, 1:] - groups[:, :1]).mean()


def answer_ids(tokenizer, gist):
    """Token ids of a DocID as the assistant's answer inside the chat (end-of-turn included)."""
    example = lm.encode_example(tokenizer, "q", gist, 10_000)
    return [t for t in example["labels"] if t != lm.IGNORE_INDEX]


@torch.no_grad()
def rerank(model, tokenizer, prompts, candidates, gists, token_id, batch_size, progress=True):
    """Each prompt's candidate documents re-ordered by the ranking token's logit after [prompt ->
    candidate DocID]. Each prompt is encoded once and its KV cache shared by its candidates, whose
    DocID tokens then go through the model in one pass (`batch_size` rows at a time)."""
    answers, out = {}, []
    model.eval()
    width = max([len(c) for c in candidates] + [1])
    per_chunk = max(1, batch_size // width)
    for start in tqdm(range(0, len(prompts), per_chunk), desc="rerank", disable=not progress, dynamic_ncols=True):
        cands = candidates[start:start + per_chunk]
        if not any(cands):
            out.extend([] for _ in cands)
            continue
        m = max(len(c) for c in cands)
        rows = [answers.setdefault(d, answer_ids(tokenizer, gists[d])) if j < len(c) else []
                for c in cands for j, d in enumerate(c + [None] * (m - len(c)))]
        tokens, _ = lm.pad_rows(rows, 0)
        lengths = torch.tensor([len(r) for r in rows], device=model.device)
        batch = decoding.PromptBatch(model, prompts[start:start + per_chunk], repeats=m)
        last = batch.last_hidden(tokens.to(model.device), lengths)
        scores = (last @ model.get_output_embeddings().weight[token_id]).float()
        scores = scores.masked_fill(lengths == 0, float("-inf")).view(len(cands), m).tolist()
        out.extend([c[j] for j in sorted(range(len(c)), key=lambda j: -row[j])] for c, row in zip(cands, scores))
    return out
