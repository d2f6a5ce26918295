"""`scaletrain plan`: per-rank bytes of a tiny GPT worked out by hand for each backend, spec parsing,
errors, and the fits / does-not-fit verdict.

The tiny GPT: 1 layer, width 4, 1 head, block 4, vocabulary 8, no biases, so 9 parameter tensors:
wte 8x4, wpe 4x4, ln_1 4, qkv 12x4, proj 4x4, ln_2 4, fc 16x4, mlp.proj 4x16, ln_f 4 = 252 elements
(lm_head is tied to wte and counted once). In param-group order (optim.param_groups) the decayed
matrices are wte, wpe, qkv, proj, fc, mlp.proj (240 elements), the rest ln_1, ln_2, ln_f (12).
"""

from __future__ import annotations

import json

import pytest

from scaletrain.cli import main
from scaletrain.config import load_config
from scaletrain.engines.plan import activation_bytes, parse_backends, parse_bytes, plan_memory
from scaletrain.errors import ConfigError

TINY = ["model.n_layer=1", "model.n_head=1", "model.n_embd=4", "model.block_size=4", "model.vocab_size=8",
        "train.micro_batch_size=2"]
P, TENSORS, STEP = 252, 9, 4


def _plan(spec: str, world: int = 2, extra: tuple[str, ...] = (), **kw):
    return plan_memory(load_config(None, [*TINY, *extra]), world, spec, **kw)


def test_counts_the_meta_model_once_per_tied_tensor():
    assert _plan("ddp").n_params == P


def test_ddp_replicates_everything_and_adds_its_gradient_buckets():
    e = _plan("ddp")
    assert (e.params, e.grads, e.optimizer, e.buffers) == (4 * P, 4 * P, 8 * P + TENSORS * STEP, 4 * P)


def test_fsdp_full_shard_halves_model_state_at_two_ranks():
    e = _plan("fsdp", rank=0)
    assert (e.params, e.grads, e.optimizer) == (4 * 126, 4 * 126, 8 * 126 + TENSORS * STEP)


def test_fsdp_pads_dim0_per_tensor_and_the_last_rank_holds_less_state():
    # world 3, chunks of ceil(rows / 3) rows: wte 3x4, wpe 2x4, ln 2, qkv 4x4, proj 2x4, fc 6x4,
    # mlp.proj 2x16 -> 106 padded elements on every rank (storage); rank 2 owns 2 rows of wte, 4 of
    # qkv and 4 of fc = 40 elements, which is all AdamW's moments are sized by.
    last = _plan("fsdp:full_shard", world=3, rank=2)
    assert (last.params, last.grads, last.optimizer) == (4 * 106, 4 * 106, 8 * 40 + TENSORS * STEP)
    worst = _plan("fsdp:full_shard", world=3)
    assert worst.rank == 0 and worst.optimizer == 8 * 106 + TENSORS * STEP


def test_shard_grad_op_keeps_every_block_gathered():
    full, sgo = _plan("fsdp"), _plan("fsdp:shard_grad_op")
    assert (sgo.params, sgo.grads, sgo.optimizer) == (full.params, full.grads, full.optimizer)
    # 1 block: both gather the root and the block (252 elements), plus one block's fp32 gradients
    assert sgo.buffers == full.buffers == 4 * P + 4 * 200
    # 4 blocks: full_shard holds the root, the block in use and the prefetched one; shard_grad_op all
    deep = ("model.n_layer=4",)
    assert _plan("fsdp:shard_grad_op", extra=deep).buffers - _plan("fsdp", extra=deep).buffers == 4 * 2 * 200


def test_hybrid_shard_shards_within_a_node_only():
    e = _plan("fsdp:hybrid_shard", world=4, procs_per_node=2)
    assert e.params == _plan("fsdp", world=2).params


def test_tp_divides_the_split_matrices():
    # tp:2 at world 2: qkv, proj, fc and mlp.proj halved; embeddings and norms whole; FSDP over 1 rank.
    e = _plan("tp:2", extra=("model.n_head=2",))
    local = 32 + 16 + 4 + 24 + 8 + 4 + 32 + 32 + 4
    assert (e.params, e.grads, e.optimizer) == (4 * local, 4 * local, 8 * local + TENSORS * STEP)


@pytest.mark.parametrize("stage", [1, 2])
def test_zero12_flat_groups_fp32_partition_copy_and_overlapping_gradients(stage: int):
    # Groups of 240 and 12 elements (aligned to 4): partitions of 120 and 6. Rank 0's gradient buffer
    # holds every whole parameter that overlaps its partition: wte..fc (176) + ln_1, ln_2 (8).
    r0 = _plan(f"deepspeed:{stage}", rank=0)
    assert r0.params == 4 * P
    assert r0.grads == 4 * 184
    assert r0.optimizer == (120 + 6) * (4 + 8) + 2 * STEP  # fp32 partition + moments, one step per group
    assert _plan(f"deepspeed:{stage}", rank=1).grads == 4 * (128 + 8)
    assert r0.buffers == 4 * 25_000_000  # the reduce bucket (ds_config default)


def test_zero3_partitions_each_parameter_and_keeps_small_ones_whole(tmp_path):
    e = _plan("deepspeed:3")
    # The persistence threshold follows the width (10 x 4 = 40 elements): qkv (48), fc (64) and the MLP
    # projection (64) are partitioned only, every other tensor is also whole on every rank. In fp32 the
    # master copy shares the partition, so the optimizer holds the two moments alone.
    assert (e.params, e.grads, e.optimizer) == (4 * (126 + P - 176), 4 * 126, 126 * 8 + 2 * STEP)
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}))
    cfg = load_config(None, [*TINY, f"backend.deepspeed.config={ds}", "backend=deepspeed"])
    assert plan_memory(cfg, 2).params == 4 * 126


def test_offload_moves_state_to_the_host():
    e = _plan("deepspeed:3+offload")
    assert e.grads == e.optimizer == 0 and e.host == 4 * 126 + 126 * 12 + 2 * STEP + 4 * 126
    f = _plan("fsdp+offload")
    assert f.params == f.grads == f.optimizer == 0 and f.host == 4 * 126 * 2 + 8 * 126 + TENSORS * STEP


def test_activation_formula_by_hand():
    # b*s = 8 tokens, h = 4, ffn 16, 1 head, vocab 8, fp32: per layer 8 * (4*4 + 3*4 + 2*4 + 2*16) * 4
    # + the log-sum-exp 8 * 1 * 4; head: ln_f out 8*4*4, logits 8*8*4, log-softmax and its grad 2*8*8*4.
    dims = {"layers": 1, "h": 4, "heads": 1, "ffn": 16, "kv": 4, "vocab": 8, "kind": 0}
    got = activation_bytes(dims, micro_batch=2, seq=4, precision="fp32", checkpointing=False)
    assert got == 8 * 68 * 4 + 32 + 128 + 256 + 512
    assert _plan("ddp").activations == got
    deep = {**dims, "layers": 12}
    with_ac = activation_bytes(deep, micro_batch=2, seq=4, precision="fp32", checkpointing=True)
    assert with_ac < activation_bytes(deep, micro_batch=2, seq=4, precision="fp32", checkpointing=False)
    assert _plan("fsdp", extra=("backend.fsdp.activation_checkpointing=true",)).activations != _plan("fsdp").activations


def test_fits_and_does_not_fit():
    small = _plan("ddp", device_memory=10**9)
    assert small.fits is True
    assert _plan("ddp", device_memory=small.total - 1).fits is False
    assert _plan("ddp").fits is None


def test_parsing():
    assert parse_bytes("80GB") == 80 * 10**9 and parse_bytes("1GiB") == 2**30 and parse_bytes("512") == 512
    assert parse_backends("ddp, fsdp:hybrid_shard,tp:2,deepspeed:3+offload") == [
        "ddp", "fsdp:hybrid_shard", "tp:2", "deepspeed:3+offload"]


@pytest.mark.parametrize(("call", "needle"), [
    (lambda: parse_backends("ddp,zero9"), "unknown backend"),
    (lambda: parse_backends("deepspeed:4"), "unknown ZeRO stage"),
    (lambda: parse_bytes("lots"), "--device-memory"),
    (lambda: _plan("tp:2", world=3), "must divide the world size"),
    (lambda: _plan("ddp", world=0), "--world"),
    (lambda: _plan("fsdp:hybrid_shard", world=4, procs_per_node=3), "shard_group_size"),
    (lambda: plan_memory(load_config(None, ["data.path=no-such-plan-data"]), 2, "ddp"), "model.vocab_size"),
])
def test_bad_input_is_one_config_error_line(call, needle):
    with pytest.raises(ConfigError, match=needle) as err:
        call()
    assert "\n" not in str(err.value)


def test_cli_table_json_and_exit_codes(capsys):
    assert main(["plan", "--world", "2", "--backends", "ddp,deepspeed:2", "--device-memory", "1MB", *TINY,
                 "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["spec"] for r in rows] == ["ddp", "deepspeed:2"]
    assert rows[0]["fits"] is True and rows[1]["fits"] is False  # the 100 MB reduce bucket does not fit
    assert main(["plan", "--world", "2", "--backends", "fsdp", *TINY]) == 0
    assert "fsdp" in capsys.readouterr().out
    assert main(["plan", "--world", "2", "--backends", "nope", *TINY]) == 2
    assert "unknown backend" in capsys.readouterr().err


def test_user_factories_and_hf_models_are_counted_from_their_meta_build():
    pytest.importorskip("transformers")
    import hf_models
    import models

    from scaletrain.model.build import count_params

    cfg = load_config(None, ["model.factory=hf_models:gpt2", "model.vocab_size=50", "model.block_size=16"])
    e = plan_memory(cfg, 2, "ddp")
    assert e.n_params == count_params(hf_models.gpt2(cfg.model, 50))  # wte tied to lm_head: once
    assert e.params == 4 * e.n_params and e.activations > 0 and not e.notes
    plain = plan_memory(load_config(None, ["model.factory=models:tiny_lm", "model.vocab_size=50"]), 2, "fsdp")
    assert plain.n_params == count_params(models.tiny_lm(None, 50))
    assert plain.activations == 0 and "activations unknown" in plain.notes[0]


def test_vocabulary_comes_from_the_prepared_data_folder(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"vocab_size": 8, "dtype": "uint16"}))
    for split in ("train", "val"):
        (tmp_path / f"{split}.bin").write_bytes(b"")
    cfg = load_config(None, [*(o for o in TINY if not o.startswith("model.vocab_size")), f"data.path={tmp_path}"])
    assert plan_memory(cfg, 2, "ddp").n_params == P


def test_without_backends_plan_lists_every_backend_and_strategy(capsys):
    """Leftover 2: no --backends means every registered backend's specs; those that do not fit the world
    size or the model are left out with a note (exit 0), not an error."""
    from scaletrain.engines import registry
    from scaletrain.engines.plan import plan_every_backend

    heads2 = [o if not o.startswith("model.n_head") else "model.n_head=2" for o in TINY]
    assert main(["plan", "--world", "8", "--device-memory", "1GB", *heads2, "--json"]) == 0
    out = capsys.readouterr()
    rows = {r["spec"]: r for r in json.loads(out.out)}
    specs = list(rows)
    assert specs == registry.default_specs() and not out.err
    for want in ("ddp", "fsdp:full_shard", "fsdp:shard_grad_op", "fsdp:hybrid_shard", "fsdp:no_shard", "tp:2",
                 "deepspeed:1", "deepspeed:2", "deepspeed:3", "deepspeed:3+offload"):
        assert want in specs
    # The rows are those --backends gives for the same specs.
    assert rows["tp:2"] == _plan("tp:2", world=8, extra=("model.n_head=2",), device_memory=10**9).to_dict()
    # World 3: tp:2 does not divide it; one head: tp:2 does not divide the heads. Either way a note.
    rows, notes = plan_every_backend(load_config(None, heads2), 3)
    assert "tp:2" not in [r.spec for r in rows] and len(rows) == len(specs) - 1
    assert notes == ["tp:2 left out: backend.tp_size (2) must divide the world size (3)"]
    rows, notes = plan_every_backend(load_config(None, TINY), 2)
    assert [n.split(":")[0] for n in notes] == ["tp"] and "tp:2 left out" in notes[0]
    assert main(["plan", "--world", "3", *heads2]) == 0
    assert "tp:2 left out" in capsys.readouterr().out


def test_the_configured_backend_comes_first_when_no_default_names_it():
    from scaletrain.engines.plan import plan_every_backend

    cfg = load_config(None, [*TINY, "backend=fsdp", "backend.tp_size=4", "model.n_head=4", "model.n_embd=8"])
    rows, _ = plan_every_backend(cfg, 4)
    assert rows[0].spec == "tp:4" and rows[0] == plan_memory(cfg, 4)
