"""sparsepo: distributed preference optimisation (DPO, IPO, SimPO, TDPO, FPO, SePO, SPO) on DeepSpeed.

Kept light on purpose: importing the package imports nothing heavy; import submodules directly
(`sparsepo.losses`, `sparsepo.config`, `sparsepo.data`, ...).
"""

__version__ = "0.1.0"
