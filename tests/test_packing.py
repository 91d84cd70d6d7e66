"""Packing (data.packing=true): the bins, the packed batches, the loss of a packed batch against the same samples
unpacked (tiny OPT and a tiny Llama, sdpa and eager attention, fp32), the data cache and step arithmetic, and the
methods that refuse it."""

from __future__ import annotations

import pytest
import torch

from runner.data import batches, packing
from runner.driver import job
from runner.driver.plan import make_plan
from runner.errors import ConfigError
from tests.helpers import CPU


def samples(n: int, seed: int, vocab: int = 1000) -> list[dict]:
    """Token sequences whose lengths vary 10x (4..40), each with a prompt of 1..half its length."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 41, (1,), generator=g))
        prompt = int(torch.randint(1, length // 2 + 1, (1,), generator=g))
        out.append({"input_ids": torch.randint(3, vocab, (length,), generator=g).tolist(), "prompt_len": prompt})
    return out


def packed_rows(rows: list[dict], capacity: int, seed: int = 0) -> list[dict]:
    bins = packing.pack_lengths([len(r["input_ids"]) for r in rows], capacity, seed)
    return [
        {
            "input_ids": [t for i in b for t in rows[i]["input_ids"]],
            "lengths": [len(rows[i]["input_ids"]) for i in b],
            "prompt_lens": [rows[i]["prompt_len"] for i in b],
        }
        for b in bins
    ]


def test_bins_hold_every_sample_once_within_capacity_and_are_seeded():
    lengths = [len(r["input_ids"]) for r in samples(300, seed=1)]
    bins = packing.pack_lengths(lengths, 64, seed=7)
    assert sorted(i for b in bins for i in b) == list(range(300))
    assert max(sum(lengths[i] for i in b) for b in bins) <= 64
    assert len(bins) <= -(-sum(lengths) // 64) + 2  # best-fit decreasing: within a couple of rows of the bound
    assert packing.pack_lengths(lengths, 64, seed=7) == bins  # the same on every rank and every run
    assert packing.pack_lengths(lengths, 64, seed=8) != bins  # ties between equal lengths are broken by the seed
    with pytest.raises(ValueError, match="more than the row's 8"):
        packing.pack_lengths([5, 9], 8, seed=0)


def test_a_packed_batch_restarts_positions_and_never_targets_a_sample_start():
    rows = [
        {"input_ids": [5, 6, 7, 8, 9], "lengths": [3, 2], "prompt_lens": [1, 1]},
        {"input_ids": [1, 2, 3], "lengths": [3], "prompt_lens": [2]},
    ]
    b = packing.PackedCollator(pad_id=0)(rows)
    assert b["input_ids"].tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 0, 0]]
    assert b["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 0, 1]]  # padding: a block of its own
    assert b["labels"].tolist() == [[-100, 6, 7, -100, 9], [-100, -100, 3, -100, -100]]
    with_prompt = packing.PackedCollator(pad_id=0, train_on_prompt=True)(rows)["labels"]
    assert with_prompt.tolist()[0] == [-100, 6, 7, -100, 9]  # the 2nd sample's first token: never a target
    mask = packing.block_causal_mask(b["seq_ids"])[0, 0].int().tolist()
    assert mask == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [0, 0, 0, 1, 1]]
    flat = packing.model_inputs(b, "flash_attention_2", torch.float32)  # varlen: one row, no padding
    assert set(flat) == {"input_ids", "labels", "position_ids"}
    assert flat["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1, 2, 3]]
    assert flat["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2]]
    with pytest.raises(ConfigError, match="data.packing"):
        packing.model_inputs(b, "flex_attention", torch.float32)


def tiny_model(arch: str, attention: str):
    from transformers import AutoModelForCausalLM, LlamaConfig, OPTConfig

    torch.manual_seed(0)
    if arch == "opt":  # conf/model/tiny.yaml's architecture
        config = OPTConfig(
            hidden_size=128, num_hidden_layers=2, num_attention_heads=4, ffn_dim=512, vocab_size=1024,
            max_position_embeddings=256, word_embed_proj_dim=128, dropout=0.0, attention_dropout=0.0,
        )  # fmt: skip
    else:  # grouped-query attention and rotary positions, as Llama / Qwen
        config = LlamaConfig(
            hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=1024, max_position_embeddings=256,
        )  # fmt: skip
    return AutoModelForCausalLM.from_config(config, attn_implementation=attention, dtype=torch.float32).eval()


def loss_sums(model, batch: dict) -> tuple[float, int]:
    """The summed next-token loss over the labelled tokens, and their count."""
    labels = batch.pop("labels")
    with torch.no_grad():
        logits = model(**batch).logits.float()
    shifted = labels[:, 1:]
    summed = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)), shifted.reshape(-1), ignore_index=batches.IGNORE, reduction="sum"
    )
    return float(summed), int((shifted != batches.IGNORE).sum())


@pytest.mark.parametrize("arch", ["opt", "llama"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("train_on_prompt", [False, True])
def test_packed_loss_equals_the_unpacked_loss_of_the_same_samples(arch, attention, train_on_prompt):
    model, rows = tiny_model(arch, attention), samples(24, seed=3)
    plain = batches.CausalLMCollator(pad_id=1, train_on_prompt=train_on_prompt)
    unpacked = [loss_sums(model, plain(rows[i : i + 4])) for i in range(0, len(rows), 4)]
    packed_batch = packing.PackedCollator(pad_id=1, train_on_prompt=train_on_prompt)(packed_rows(rows, 96))
    assert packed_batch["input_ids"].shape[0] < len(rows) / 2  # several samples per row
    inputs = packing.model_inputs(packed_batch, attention, torch.float32)
    loss, tokens = loss_sums(model, inputs)
    assert tokens == sum(t for _, t in unpacked)
    assert loss == pytest.approx(sum(s for s, _ in unpacked), rel=1e-5)
    # without the block mask the samples see each other: the loss differs by far more than the tolerance above
    leaky = {k: v for k, v in packed_batch.items() if k != "seq_ids"}
    assert abs(loss_sums(model, leaky)[0] - loss) > 10 * 1e-5 * loss


@pytest.mark.parametrize("step", ["reward", "dpo", "ppo", "grpo", "self_feedback"])
def test_methods_without_single_sequences_refuse_packing(compose, step):
    with pytest.raises(ConfigError) as err:
        make_plan(compose([f"step={step}", "data.packing=true"]), CPU)
    assert err.value.where == "data.packing" and "does not apply" in str(err.value)


def test_packing_must_be_a_bool(compose):
    with pytest.raises(ConfigError, match="true or false") as err:
        make_plan(compose(["data.packing=sometimes"]), CPU)
    assert err.value.where == "data.packing"


def test_the_cache_holds_packed_rows_and_a_step_counts_rows(compose, tmp_path):
    """Every training sample is in exactly one packed row (no row longer than data.max_seq_len), evaluation stays
    unpacked, and steps per epoch are the packed rows over the rows one step takes."""
    from runner.data.prepare import load_prepared

    common = [f"cache_dir={tmp_path}", "data.max_seq_len=64", "train.micro_batch_size=2"]
    plain = job.prepare(compose(common)).plan.cfg.runtime
    packed_cfg = compose([*common, "data.packing=true", "train.gradient_accumulation_steps=3"])
    packed = job.prepare(packed_cfg).plan.cfg.runtime
    counts = packed.data.counts
    assert counts.train_samples == plain.data.counts.train and counts.eval == plain.data.counts.eval
    assert counts.train < counts.train_samples / 2
    assert packed.steps_per_epoch == counts.train // (2 * 3) and plain.steps_per_epoch == plain.data.counts.train // 2
    assert packed.data.stats.packing.rows == counts.train and 0.5 < packed.data.stats.packing.fill <= 1
    rows, singles = load_prepared(packed.data.paths.train), load_prepared(plain.data.paths.train)
    assert max(len(r) for r in rows["input_ids"]) <= 64
    assert all(sum(r["lengths"]) == len(r["input_ids"]) for r in rows)
    pieces = []
    for r in rows:
        start = 0
        for n, p in zip(r["lengths"], r["prompt_lens"]):
            pieces.append((tuple(r["input_ids"][start : start + n]), p))
            start += n
    assert sorted(pieces) == sorted((tuple(s["input_ids"]), s["prompt_len"]) for s in singles)
