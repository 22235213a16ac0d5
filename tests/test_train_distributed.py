"""`train adapter` in two processes under `accelerate launch` (CPU, gloo): both ranks end with identical weights."""

from __future__ import annotations

import textwrap

import torch
from helpers import accelerate_launch, adapter_for
from safetensors import safe_open
from safetensors.torch import load_file

from spatiallock.checkpoint import list_checkpoints

# Run under `accelerate launch`: trains through `train_adapter`, then every rank saves the weights it ends with.
RANK_SCRIPT = textwrap.dedent(
    """
    import sys

    from accelerate import PartialState
    from safetensors.torch import save_file

    from spatiallock.training.adapter import AdapterTrainConfig, train_adapter
    from spatiallock.training.loop import LoopConfig

    base, data, out, evidence = sys.argv[1:]
    loop = LoopConfig(max_steps=3, batch_size=2, learning_rate=1e-3, checkpoint_every=2, progress=False)
    result = train_adapter(AdapterTrainConfig(base=base, data=data, out=out, loop=loop))
    state = PartialState()
    weights = {k: v.detach().cpu().contiguous() for k, v in result.models["adapter"].state_dict().items()}
    metadata = {
        "world_size": str(state.num_processes), "backend": str(state.backend), "step": str(result.step),
        "loss": repr(result.last_losses["loss"]),
    }
    save_file(weights, f"{evidence}/rank{state.process_index}.safetensors", metadata=metadata)
    """
)


def test_two_cpu_processes_train_identical_weights(tiny_sd, tiny_shapes, tmp_path):
    script, out, evidence = tmp_path / "train_ranks.py", tmp_path / "adapter", tmp_path / "ranks"
    script.write_text(RANK_SCRIPT)
    evidence.mkdir()
    done = accelerate_launch([str(script), str(tiny_sd), str(tiny_shapes), str(out), str(evidence)], tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    metadata, weights = {}, {}
    for rank in (0, 1):
        path = evidence / f"rank{rank}.safetensors"
        with safe_open(str(path), "pt") as f:
            metadata[rank] = f.metadata()
        weights[rank] = load_file(path)
    for rank in (0, 1):
        assert metadata[rank]["world_size"] == "2" and metadata[rank]["backend"] == "gloo"
        assert metadata[rank]["step"] == "3"
    # each rank saw its own batches and noise: different losses ...
    assert metadata[0]["loss"] != metadata[1]["loss"]
    # ... yet, gradients being averaged, bit-identical weights
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # the main process wrote the adapter, the checkpoints and the log, once
    written = load_file(out / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(v, weights[0][k]) for k, v in written.items())
    assert [p.name for p in list_checkpoints(out / "train" / "checkpoints" / "adapter")] == [
        "checkpoint-2",
        "checkpoint-3",
    ]
    assert len((out / "train" / "log.jsonl").read_text().splitlines()) == 1  # step 3 (log_every 10)
    # and it trained: 3 steps moved the weights from the initial ones
    init = adapter_for(tiny_sd).state_dict()
    assert weights[0]["fusers.0.gate_attn"].item() != 0.0
    assert sum(not torch.equal(init[k], weights[0][k]) for k in init) >= 0.9 * len(init)
