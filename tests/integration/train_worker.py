"""Run by tests/integration/test_ddp.py under `accelerate launch` (2 CPU processes): trains tiny models a few steps and writes
the losses and a parameter checksum per rank to OUT_DIR."""

import json
import sys

import torch

from flythinker.methods import ModelArgs, get_method
from flythinker.testing import tiny_lm
from flythinker.training.config import TrainArgs
from flythinker.training.loop import fit
from tests.training.test_loop import make_features  # PYTHONPATH is the repository root


def main(out_dir: str, batch_size: int) -> None:
    torch.set_num_threads(1)
    model = get_method("flythinker").from_lms(tiny_lm("llama", seed=1), tiny_lm("llama", seed=2, num_layers=1),
                                              ModelArgs())
    args = TrainArgs(out_dir=out_dir, max_steps=3, batch_size=batch_size, grad_accum=2, lr_generator=1e-2,
                     lr_reasoner=1e-2, progress=False, save_final=False)
    res = fit(model, make_features(8), args, pad_token_id=0)
    from accelerate import PartialState

    rank = PartialState().process_index
    checksum = float(sum(p.detach().double().sum() for p in model.parameters()))
    with open(f"{out_dir}/rank{rank}.json", "w") as fh:
        json.dump({"losses": res.losses, "checksum": checksum}, fh)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
