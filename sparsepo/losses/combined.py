"""Weighted sums of table rows: `method.name: [dpo, sft]`, `method.weights: [1.0, 0.1]`.

TRL's `loss_type` list with `loss_weights` (e.g. MPO = sigmoid + bco_pair + sft). The combined row's
params are one flat dataclass, the union of the components' fields plus `weights`; each component's
own params are built from it, so each validates as it does alone. A key two components share (such
as `beta`) is one value used by both when set, as in TRL; where their defaults differ (SimPO's β=2
and DPO's β=0.1) it defaults to None, meaning each component keeps its own default.
The table (`get_method` with a list) builds the row; this module holds the pieces that need no table.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from sparsepo.losses.common import check, make_output
from sparsepo.losses.knobs import FDivKnob
from sparsepo.losses.types import LossInputs, LossOutput


def combined_params_cls(names: tuple[str, ...], params_classes: tuple[type, ...],
                        loss_fns: tuple[Callable, ...]) -> type:
    """A dataclass `<A>Plus<B>Params` with the union of the components' fields and `weights`."""
    fields: dict[str, tuple] = {}
    defaults: dict[str, set] = {}
    for cls in params_classes:
        for f in dataclasses.fields(cls):
            check(f.default_factory is dataclasses.MISSING, "+".join(names), f"{cls.__name__}.{f.name} has a default "
                  f"factory, which a combination cannot share")
            defaults.setdefault(f.name, set()).add(repr(f.default))
            fields.setdefault(f.name, (f.name, f.type, f.default))
    shared_unset = {n for n, d in defaults.items() if len(d) > 1}
    fields = {n: ((n, f"{tp} | None" if isinstance(tp, str) else tp | None, dataclasses.field(default=None))
                  if n in shared_unset else (n, tp, dataclasses.field(default=default)))
              for n, (_, tp, default) in fields.items()}
    check("weights" not in fields, "+".join(names), "a component has a field named 'weights'")
    fields["weights"] = ("weights", Any, dataclasses.field(default=None))

    def __post_init__(self) -> None:
        owner = f"{type(self).__name__}"
        weights = [1.0] * len(names) if self.weights is None else self.weights
        check(isinstance(weights, (list, tuple)) and len(weights) == len(names)
              and all(isinstance(w, (int, float)) and not isinstance(w, bool) for w in weights), owner,
              f"weights must be a list of {len(names)} numbers, one per method in {list(names)} (got {self.weights!r})")
        check(all(w >= 0 for w in weights) and any(w > 0 for w in weights), owner,
              f"weights must be >= 0 and not all 0 (got {list(weights)})")
        self.weights = [float(w) for w in weights]
        values = dataclasses.asdict(self)
        parts = []
        for name, cls, fn in zip(names, params_classes, loss_fns):
            own = {f.name: values[f.name] for f in dataclasses.fields(cls)
                   if not (f.name in shared_unset and values[f.name] is None)}
            parts.append((name, fn, cls(**own)))
        object.__setattr__(self, "parts", tuple(parts))
        _check_f_divergence(owner, parts)

    def input_needs(self) -> dict[str, bool]:
        """The flags the components' knobs add (e.g. DPO's `ld_alpha` in [dpo, sft])."""
        needs: dict[str, bool] = {}
        for _, _, own in self.parts:
            for flag, on in (own.input_needs() if hasattr(own, "input_needs") else {}).items():
                needs[flag] = needs.get(flag, False) or on
        return needs

    def absent_key_value(key: str, old: dict):
        """What a key absent from an older checkpoint meant, as the first component that knows says."""
        for cls in params_classes:
            value = cls.absent_key_value(key, old) if hasattr(cls, "absent_key_value") else dataclasses.MISSING
            if value is not dataclasses.MISSING:
                return value
        return dataclasses.MISSING

    renamed = {old: new for cls in params_classes for old, new in getattr(cls, "renamed_keys", {}).items()}
    cls_name = "Plus".join(n.title().replace("_", "") for n in names) + "Params"
    cls = dataclasses.make_dataclass(cls_name, list(fields.values()), kw_only=True,
                                      namespace={"__post_init__": __post_init__, "input_needs": input_needs,
                                                 "absent_key_value": staticmethod(absent_key_value),
                                                 "renamed_keys": renamed,
                                                 "__doc__": f"Params of {' + '.join(names)}: each component's "
                                                            f"fields (a shared key is one value; None keeps each "
                                                            f"component's default) and `weights`."})
    cls.__module__ = __name__
    return cls


def _check_f_divergence(owner: str, parts) -> None:
    """f-DPO's divergence on a component beside one that cannot take it is refused, as TRL 1.16 refuses
    `f_divergence_type` with any loss type outside its list (sft may sit beside it: no reward there)."""
    bent = [name for name, _, own in parts if getattr(own, "f_divergence_type", "reverse_kl") != "reverse_kl"]
    plain = [name for name, _, own in parts if not isinstance(own, FDivKnob) and name != "sft"]
    check(not (bent and plain), owner, f"f_divergence_type applies to {bent} but {plain} take no f-divergence "
          f"(their loss reads each reward on its own, where f-DPO's log Z(x) does not cancel); use reverse_kl, or "
          f"combine {bent} only with rows that take it")


def combined_loss(inputs: LossInputs, params) -> LossOutput:
    """Σ_i w_i · loss_i per pair. Rewards, "margin" and "accuracy" are the first component's; each
    component adds "loss_<name>" (its mean loss) and its own metrics as "<name>_<metric>"."""
    losses, metrics, first = None, {}, None
    for (name, fn, own), weight in zip(params.parts, params.weights):
        out = fn(inputs, own)
        first = first or out
        losses = weight * out.losses if losses is None else losses + weight * out.losses
        metrics[f"loss_{name}"] = out.losses.mean()
        metrics.update({f"{name}_{key}": value for key, value in out.metrics.items()})
    return make_output(losses, first.chosen_rewards, first.rejected_rewards, **metrics)
