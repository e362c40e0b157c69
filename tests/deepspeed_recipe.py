"""`recipes/train_gpt2.py` under DeepSpeed on a CPU: the accelerate CPU shim, then the recipe's `main`.

`DS_ACCELERATOR=cpu python -m torch.distributed.run --nproc_per_node 2 tests/deepspeed_recipe.py
--deepspeed recipes/accelerate/deepspeed_zero2.json ...` (the recipe's own flags). The user's
command needs no shim: `accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml
recipes/train_gpt2.py ...`, with `--ddp_backend gloo` on a CPU.
"""

import os
import runpy
import sys

from deepspeed_cpu import cpu_deepspeed_state

if __name__ == "__main__":
    cpu_deepspeed_state()
    recipe = os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "recipes", "train_gpt2.py"
    )
    sys.argv = [recipe, *sys.argv[1:]]
    runpy.run_path(recipe, run_name="__main__")
