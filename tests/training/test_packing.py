"""Sequence packing for the SFT / pretraining loss equals padded rows, for both model families.

A collated micro-batch of three samples of different lengths (one video; text only; two videos) goes
through :func:`vlm_loss_step` padded (``pack=False``) and packed: one row, and first-fit rows of a
``seq_length`` that holds the first two samples but not the third. At world 1 the per-token losses
of every sample, the loss sum, the token count and every gradient (tower, projector, LLM) equal the
padded ones; at CP=2 (all_gather and p2p) the packed loss and gradients equal both the padded CP=2
run and world 1. The packing itself (rows, segments, positions, shifted targets, the layout's
visibility) is checked without processes.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import init_cpu_dist, run_ranks

VOCAB, VIDEO_ID, PAD, TOL = 128, 3, 0, 1e-5
LENGTHS = (30, 12, 48)
"""Sample lengths: 30 + 12 fit a row of 48 (the longest), the third needs its own."""


def _cfg(family: str):
    from megatron_longvideo.models.llm import LLMConfig

    if family == "qwen2_5_vl":
        from megatron_longvideo.models.qwen2_5_vl.model import Qwen25VLConfig
        from megatron_longvideo.models.qwen2_5_vl.vision import QwenVisionConfig

        return Qwen25VLConfig(llm=LLMConfig(vocab_size=VOCAB, mrope_section=(2, 3, 3)), video_token_id=VIDEO_ID,
                              vision=QwenVisionConfig(window_size=56, fullatt_block_indexes=(1,)))
    from megatron_longvideo.models.llava_onevision.model import VLMConfig
    from megatron_longvideo.models.llava_onevision.vision import VisionConfig

    return VLMConfig(llm=LLMConfig.tiny(vocab_size=VOCAB), vision=VisionConfig(), video_token_id=VIDEO_ID)


def _num_tokens(cfg, frames: torch.Tensor) -> int:
    if hasattr(cfg, "num_video_tokens"):  # Qwen2.5-VL: by frames and pixels
        return cfg.num_video_tokens(frames.shape[0], frames.shape[-2], frames.shape[-1])
    return cfg.vision.num_video_tokens(frames.shape[0])


def collated_batch(family: str) -> dict:
    """What the collator gives: right-padded ids, aligned labels (IGNORE on prompt, videos, padding),
    ``attention_mask`` and per-sample lists of videos (one; none; two)."""
    from megatron_longvideo.data.prompts import IGNORE_INDEX

    cfg = _cfg(family)
    g = torch.Generator().manual_seed(7)
    size = (56, 84) if family == "qwen2_5_vl" else (32, 32)
    frames = [[torch.randn(3, 3, *size, generator=g)], [],
              [torch.randn(2, 3, *size, generator=g), torch.randn(1, 3, *size, generator=g)]]
    b, s = len(LENGTHS), max(LENGTHS)
    ids = torch.full((b, s), PAD, dtype=torch.long)
    labels = torch.full((b, s), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros(b, s, dtype=torch.bool)
    for i, (n, videos) in enumerate(zip(LENGTHS, frames)):
        ids[i, :n] = torch.randint(4, VOCAB, (n,), generator=g)
        labels[i, 3:n] = ids[i, 3:n]  # the first tokens are the prompt
        start = 2
        for v in videos:
            k = _num_tokens(cfg, v)
            ids[i, start : start + k] = VIDEO_ID
            labels[i, start : start + k] = IGNORE_INDEX
            start += k + 2
        assert start < n
        attention[i, :n] = True
    return {"input_ids": ids, "labels": labels, "attention_mask": attention, "videos": frames}


# --- the packing itself (no processes) -------------------------------------------------------------


def test_pack_rows_targets_segments_and_layout():
    from megatron_longvideo.attention.dense import visible_mask
    from megatron_longvideo.training.packing import first_fit, pack_vlm_batch, packed_positions
    from megatron_longvideo.training.vlm_step import prepare_vlm_batch

    batch = collated_batch("llava_onevision")
    padded = prepare_vlm_batch(batch, pad_id=PAD, multiple=4)
    one = pack_vlm_batch(batch, pad_id=PAD, multiple=4)
    assert one["input_ids"].shape == (1, 92) and one["rows"] == [[0, 1, 2]]  # 90 tokens, rounded up to 4
    two = pack_vlm_batch(batch, pad_id=PAD, multiple=4, seq_length=48)
    assert two["input_ids"].shape == (2, 48) and two["rows"] == [[0, 1], [2]]
    for packed in (one, two):
        assert packed["loss_mask"].sum() == padded["loss_mask"].sum()
        for r, spans in enumerate(packed["spans"]):
            for i, start, n in spans:  # each sample's ids, targets and mask are its padded row's first n
                for key in ("input_ids", "labels", "loss_mask"):
                    assert torch.equal(packed[key][r, start : start + n], padded[key][i, :n]), (key, i)
                assert (packed["segment_ids"][r, start : start + n] == i).all()
            end = spans[-1][1] + spans[-1][2]
            assert (packed["segment_ids"][r, end:] == -1).all() and (packed["input_ids"][r, end:] == PAD).all()
            assert not packed["loss_mask"][r, end:].any()
        assert packed["videos"] == batch["videos"]
    # positions restart per sample; no query sees another sample or the padding, each sees its own past
    pos = packed_positions(two, _cfg("llava_onevision"))
    assert pos[0, :30].tolist() == list(range(30)) and pos[0, 30:42].tolist() == list(range(12))
    visible = visible_mask(two["layout"], 1, torch.arange(48), torch.arange(48))[0, 0]  # the layout's rule
    seg = two["segment_ids"][0]
    same = (seg[:, None] == seg[None, :]) & (torch.arange(48)[None, :] <= torch.arange(48)[:, None])
    assert torch.equal(visible, same)
    assert first_fit([5, 7, 3, 1], 8) == [[0, 2], [1, 3]]
    with pytest.raises(ValueError, match="sample 2 has 48 tokens.*--seq-length=40"):
        pack_vlm_batch(batch, pad_id=PAD, multiple=4, seq_length=40)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_vlm_batch(batch, pad_id=PAD, multiple=4, seq_length=50)


def test_multimodal_positions_are_each_samples_own():
    from megatron_longvideo.training.packing import pack_vlm_batch, packed_positions

    cfg = _cfg("qwen2_5_vl")
    batch = collated_batch("qwen2_5_vl")
    packed = pack_vlm_batch(batch, pad_id=PAD, multiple=4)
    pos = packed_positions(packed, cfg)  # [3, 1, S]
    for i, start, n in packed["spans"][0]:
        alone, _ = cfg.positions(batch["input_ids"][i : i + 1, :n], batch["videos"][i])
        assert torch.equal(pos[:, 0, start : start + n], alone[:, 0]), i
    unpacked, _ = cfg.positions(batch["input_ids"], [v for sample in batch["videos"] for v in sample])
    for i, start, n in packed["spans"][0]:  # and what the padded batch gives its real tokens
        assert torch.equal(pos[:, 0, start : start + n], unpacked[:, i, :n]), i


# --- loss and gradients through the model (spawned gloo ranks) -------------------------------------


def _run(family: str, layout: dict, batch: dict, *, pack: bool, seq_length=None, weights=None, cp_type="all_gather"):
    """One forward-backward of ``batch`` through ``vlm_loss_step``: loss sum and token count (over CP),
    gradients (full shape), the weights and, at world 1, the per-token losses per sample."""
    import torch.distributed as dist

    from megatron_longvideo.checkpoint.full_state import gather_full_state, load_full_state
    from megatron_longvideo.models import build_model
    from megatron_longvideo.parallel.groups import ParallelConfig, destroy_parallel, initialize_parallel
    from megatron_longvideo.training.engine import forward_backward, wrap_ddp
    from megatron_longvideo.training.packing import pack_vlm_batch
    from megatron_longvideo.training.vlm_step import prepare_vlm_batch, sequence_multiple, vlm_loss_step

    config = ParallelConfig(context_parallel_size=layout.get("cp", 1), cp_comm_type=cp_type)
    groups = initialize_parallel(config, seed=11)
    torch.manual_seed(11)
    model = build_model(_cfg(family), groups, seed=11)
    if weights is not None:
        load_full_state(model, weights, groups)
    full_weights = gather_full_state(model, groups)
    ddp = wrap_ddp(model, groups)
    inner = vlm_loss_step(groups, pad_id=PAD, seq_length=seq_length, pack=pack)
    seen = {}

    def step(mb, chunk):
        output, loss_func = inner(mb, chunk)
        seen["losses"] = output.detach().clone()
        return output, loss_func

    ddp.zero_grad_buffer()
    reports = forward_backward(ddp, step, [batch], seq_length=0, micro_batch_size=len(LENGTHS))
    totals = sum(r["lm loss"] for r in reports)
    dist.all_reduce(totals, group=groups.cp)
    per_sample = None
    if groups.cp_size == 1:  # per-token losses of each sample's real tokens, masked
        multiple = sequence_multiple(groups)
        if pack:
            mb = pack_vlm_batch(batch, pad_id=PAD, multiple=multiple, seq_length=seq_length)
            per_sample = {i: (seen["losses"][r, s : s + n] * mb["loss_mask"][r, s : s + n])
                          for r, spans in enumerate(mb["spans"]) for i, s, n in spans}
        else:
            mb = prepare_vlm_batch(batch, pad_id=PAD, multiple=multiple)
            per_sample = {i: seen["losses"][i, :n] * mb["loss_mask"][i, :n] for i, n in enumerate(LENGTHS)}
    grads = gather_full_state(ddp, groups, what="grad")
    destroy_parallel()
    return {"sum": totals[0].item(), "count": totals[1].item(), "grads": grads, "weights": full_weights,
            "per_sample": per_sample}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _compare(got: dict, ref: dict) -> dict:
    out = {"sum": abs(got["sum"] - ref["sum"]) / abs(ref["sum"]), "count": abs(got["count"] - ref["count"]),
           "grad": max(_rel(got["grads"][k], ref["grads"][k]) for k in ref["grads"])}
    if got["per_sample"] is not None and ref["per_sample"] is not None:
        out["tokens"] = max(_rel(got["per_sample"][i], ref["per_sample"][i]) for i in ref["per_sample"])
    return out


def _worker(rank, world_size, families):
    init_cpu_dist()
    results, vacuous = {}, {}
    for family in families:
        batch = collated_batch(family)
        ref = _run(family, {}, batch, pack=False)  # padded at world 1 (on 2 ranks: 2 DP replicas of the batch)
        vacuous[family] = [k for k, g in ref["grads"].items() if g.abs().max() == 0]
        if world_size == 1:
            layout, runs = {}, {"packed": dict(pack=True), "packed_rows": dict(pack=True, seq_length=48)}
        else:
            layout = {"cp": 2}
            runs = {"padded_cp2": dict(pack=False), "packed_cp2": dict(pack=True),
                    "packed_rows_cp2_p2p": dict(pack=True, seq_length=48, cp_type="p2p")}
        for name, kwargs in runs.items():
            results[f"{family}/{name}"] = _compare(_run(family, layout, batch, weights=ref["weights"], **kwargs), ref)
    return {"results": results, "vacuous": vacuous}


def _check(out):
    assert all(v == [] for v in out["vacuous"].values()), f"zero reference gradients (vacuous): {out['vacuous']}"
    for name, r in out["results"].items():
        assert r["count"] == 0, f"{name}: token count differs: {r}"
        assert max(v for k, v in r.items() if k != "count") <= TOL, f"{name}: differs from padded rows: {r}"


FAMILIES = ("llava_onevision", "qwen2_5_vl")


def test_packed_loss_and_grads_equal_padded_world1():
    out = run_ranks(_worker, 1, FAMILIES)[0]
    _check(out)
    assert set(out["results"]) == {f"{f}/{n}" for f in FAMILIES for n in ("packed", "packed_rows")}
    assert all("tokens" in r for r in out["results"].values())


def test_packed_loss_and_grads_equal_padded_at_cp2():
    outs = run_ranks(_worker, 2, FAMILIES)
    for out in outs:
        _check(out)
    assert len(outs[0]["results"]) == 6


def test_packing_refuses_pipeline_parallelism():
    from megatron_longvideo.training.vlm_step import vlm_loss_step

    class TwoStages:  # the one thing the check reads: the pipeline group's size
        pp = "pp"

        @staticmethod
        def size(group):
            return 2 if group == "pp" else 1

    with pytest.raises(ValueError, match="--pack-sequences: not supported with pipeline parallelism"):
        vlm_loss_step(TwoStages(), pad_id=PAD, pack=True)
