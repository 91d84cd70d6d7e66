"""Kinds of rows a method trains on, and how each is tokenised (a `datasets.map` batch function each):

    sft      input_ids = prompt + target + eos, prompt_len (the loss skips the prompt unless asked)
    pairs    chosen_ids / rejected_ids = prompt + answer + eos, prompt_len (reward models, DPO)
    prompts  prompt_ids (methods that generate their own answers); an over-long prompt is never cut

Every function returns `overlong` and `keep` columns beside its own (the builder counts the first and filters on the
second), and passes the row's `extra` fields (JSON: a reference answer, the row's place in its file) through. With
`chat`, each prompt is the user's turn of the tokenizer's chat template, followed by the assistant's opening.
"""

from __future__ import annotations


def prompt_ids(tok, texts: list[str], chat: bool) -> list[list[int]]:
    """The prompts' token ids: as text (with the tokenizer's special tokens), or in its chat template."""
    if not chat:
        return tok(texts, add_special_tokens=True)["input_ids"]
    wrapped = [
        tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
        for t in texts
    ]
    return tok(wrapped, add_special_tokens=False)["input_ids"]  # (the template holds its own special tokens)


def _fit(ids: list[int], max_len: int, policy: str) -> tuple[list[int] | None, bool]:
    if len(ids) <= max_len:
        return ids, False
    return (ids[:max_len] if policy == "truncate" else None), True


def sft(batch: dict, tok, max_len: int, policy: str, chat: bool = False) -> dict:
    prompts = prompt_ids(tok, batch["prompt"], chat)
    answers = tok(batch["target"], add_special_tokens=False)["input_ids"]
    out: dict[str, list] = {"input_ids": [], "prompt_len": [], "extra": batch["extra"], "overlong": [], "keep": []}
    for p, a in zip(prompts, answers):
        ids, over = _fit(p + a + [tok.eos_token_id], max_len, policy)
        out["input_ids"].append(ids or [])
        out["prompt_len"].append(min(len(p), len(ids or [])))
        out["overlong"].append(over)
        out["keep"].append(ids is not None and len(p) < len(ids))  # at least one response token left to learn
    return out


def pairs(batch: dict, tok, max_len: int, policy: str, chat: bool = False) -> dict:
    prompts = prompt_ids(tok, batch["prompt"], chat)
    chosen = tok(batch["chosen"], add_special_tokens=False)["input_ids"]
    rejected = tok(batch["rejected"], add_special_tokens=False)["input_ids"]
    eos = [tok.eos_token_id]
    out: dict[str, list] = {
        "chosen_ids": [],
        "rejected_ids": [],
        "prompt_len": [],
        "extra": batch["extra"],
        "overlong": [],
        "keep": [],
    }
    for p, c, r in zip(prompts, chosen, rejected):
        c_ids, c_over = _fit(p + c + eos, max_len, policy)
        r_ids, r_over = _fit(p + r + eos, max_len, policy)
        out["chosen_ids"].append(c_ids or [])
        out["rejected_ids"].append(r_ids or [])
        out["prompt_len"].append(len(p))
        out["overlong"].append(c_over or r_over)
        out["keep"].append(c_ids is not None and r_ids is not None and c_ids != r_ids)  # a pair that still differs
    return out


def prompts(batch: dict, tok, max_len: int, policy: str, chat: bool = False) -> dict:
    ids = prompt_ids(tok, batch["prompt"], chat)
    over = [len(p) > max_len for p in ids]
    return {"prompt_ids": ids, "extra": batch["extra"], "overlong": over, "keep": [not o for o in over]}


KINDS = {"sft": sft, "pairs": pairs, "prompts": prompts}
COLUMNS = {
    "sft": ("input_ids", "prompt_len", "extra"),
    "pairs": ("chosen_ids", "rejected_ids", "prompt_len", "extra"),
    "prompts": ("prompt_ids", "extra"),
}


def empty(kind: str) -> dict[str, list]:
    """The columns of a kind with no rows (a slice that came out empty)."""
    return {c: [] for c in (*COLUMNS[kind], "overlong", "keep")}
