"""sparsepo: distributed preference optimisation (DPO, IPO, SimPO, TDPO, FPO, SePO, SPO) on DeepSpeed.

Kept light on purpose: importing the package imports nothing heavy; import submodules directly
(`sparsepo.losses`, `sparsepo.config`, `sparsepo.data`, ...).
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (QLoRA; peft imports it whenever it is installed) asks, on a CPU with AVX512-bf16, the Hugging
# Face Hub for an optional kernel of an inference-only weight layout that sparsepo turns off
# (`sparsepo.lora.portable_4bit`); sparsepo refuses the request (`lean_imports.bitsandbytes_offline`) and
# this mutes bitsandbytes' warning that it could not have it.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
