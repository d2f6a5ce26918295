from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

# DeepSpeed JIT-compiles its CPU ops once; every test and process shares the cache.
os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path.home() / ".cache" / "scaletrain-torch-extensions"))


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small prepared corpus (about 300 KB of the standard library) shared by the whole session."""
    from scaletrain.data.prepare import prepare

    out = tmp_path_factory.mktemp("data")
    prepare([], out, max_bytes=300_000)
    return out


@pytest.fixture(autouse=True)
def _no_leaks():
    """Fail a test that leaks a process group, a thread, or launcher environment variables."""
    env_before = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")}
    threads_before = {t.ident for t in threading.enumerate()}
    yield
    import torch.distributed as dist

    leaked = []
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        leaked.append("a process group")
    env_after = {k: os.environ.get(k) for k in env_before}
    if env_after != env_before:
        leaked.append(f"environment {env_after}")
    extra = [t for t in threading.enumerate() if t.ident not in threads_before and t.is_alive() and not t.daemon]
    if extra:
        leaked.append(f"threads {[t.name for t in extra]}")
    assert not leaked, f"test leaked {', '.join(leaked)}"
