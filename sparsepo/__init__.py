"""sparsepo: distributed preference optimisation (DPO, IPO, SimPO, TDPO, FPO, SePO, SPO) on DeepSpeed.

Kept light on purpose: importing the package imports nothing heavy; import submodules directly
(`sparsepo.losses`, `sparsepo.config`, `sparsepo.data`, ...).
"""

__version__ = "0.1.0"

import logging as _logging

# bitsandbytes (QLoRA; peft imports it whenever it is installed) tries, on a CPU with AVX512-bf16, to fetch an
# optional kernel from the Hugging Face Hub for an inference-only weight layout that sparsepo turns off
# (`sparsepo.lora.portable_4bit`), and warns in every process when it cannot: offline, always.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
