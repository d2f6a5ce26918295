"""Tensor parallel does the work split, not replicated: one forward of the built-in GPT under
`apply_tp` issues exactly two all-reduces per block (attention and MLP output projections) and no
all-gather, and each rank's attention sees only its own heads."""

from __future__ import annotations

from helpers import spawn

N_LAYER, N_HEAD, N_EMBD, VOCAB = 3, 4, 32, 64


def _count(rank: int, world: int) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.debug import CommDebugMode

    from scaletrain import dist
    from scaletrain.config import ModelConfig
    from scaletrain.engines.tensor_parallel import apply_tp
    from scaletrain.model.gpt import GPT

    dist.init(dist.current_launch(), timeout_s=60)
    try:
        torch.manual_seed(0)
        model = GPT(ModelConfig(n_layer=N_LAYER, n_head=N_HEAD, n_embd=N_EMBD, block_size=16), VOCAB)
        apply_tp(model, init_device_mesh("cpu", (world,), mesh_dim_names=("tp",)))
        x = torch.randint(VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))
        local_qkv = tuple(model.blocks[0].attn.qkv.weight.to_local().shape)
        with CommDebugMode() as comm:
            model(x)
        counts = {str(k): v for k, v in comm.get_comm_counts().items()}
        return {"counts": counts, "local_qkv": local_qkv}
    finally:
        dist.teardown()


def test_two_all_reduces_per_block_and_local_heads():
    for got in spawn(_count, timeout=120):
        assert got["counts"] == {"c10d_functional.all_reduce": 2 * N_LAYER}, got["counts"]
        assert got["local_qkv"] == (3 * N_EMBD // 2, N_EMBD)  # half the heads' q, k and v rows per rank
