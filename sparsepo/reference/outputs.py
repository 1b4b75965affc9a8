"""`ReferenceOutputs`: what the reference side hands the policy for one collated batch.

Tensors are batch-aligned (2B rows: chosen first, then rejected; T padded positions). For storage
and transport each pair is split into a *record*: per field, a list [chosen, rejected] of
response-only tensors (no padding), so a record does not depend on how its batch was padded.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

# field -> whether it is per token (T axis, stored response-only) or per sequence
_PER_TOKEN = {"token_logps": True, "topk_ids": True, "topk_logps": True, "oracle_scores": True,
              "oracle_selection": True, "seq_logps": False, "feature_ids": False, "feature_values": False}
_BITS = {"oracle_selection"}
"""0/1 per-token fields a record holds bit-packed (`pack_bits`): bytes, 1 bit per response token."""
_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(flags: torch.Tensor) -> bytes:
    """(n,) 0/1 -> ceil(n/8) bytes, token i in bit i % 8 of byte i // 8."""
    bits = torch.zeros(-(-flags.numel() // 8) * 8, dtype=torch.uint8)
    bits[:flags.numel()] = (flags.reshape(-1) != 0).to(torch.uint8)
    return bytes((bits.view(-1, 8) * _WEIGHTS).sum(-1, dtype=torch.uint8).tolist())


def unpack_bits(packed: bytes, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: (n,) bool."""
    raw = torch.tensor(list(packed), dtype=torch.uint8)
    return ((raw.unsqueeze(-1) & _WEIGHTS) != 0).reshape(-1)[:n]


class MisalignedOutputs(RuntimeError):
    """Reference outputs that do not belong to the batch they were delivered for."""


@dataclass
class ReferenceOutputs:
    example_ids: list[str]  # B pair ids
    seq_logps: torch.Tensor | None = None  # (2B,)
    token_logps: torch.Tensor | None = None  # (2B,T)
    topk_ids: torch.Tensor | None = None  # (2B,T,K) long, the reference's top-K next tokens
    topk_logps: torch.Tensor | None = None  # (2B,T,K)
    feature_ids: torch.Tensor | None = None  # (2B,k) long, FPO pooled SAE top-k
    feature_values: torch.Tensor | None = None  # (2B,k)
    oracle_scores: torch.Tensor | None = None  # (2B,T) SePO oracle token rewards
    oracle_selection: torch.Tensor | None = None  # (2B,T) 0/1 SePO key tokens (live mode; bit-packed in records)

    def present(self) -> list[str]:
        return [f.name for f in fields(self) if f.name != "example_ids" and getattr(self, f.name) is not None]

    def to_records(self, response_mask: torch.Tensor) -> list[dict[str, list[torch.Tensor]]]:
        """Split into one record per pair: {field: [chosen, rejected]} with response-only tensors."""
        b = len(self.example_ids)
        mask = response_mask.bool().cpu()
        records: list[dict[str, list[torch.Tensor]]] = [{} for _ in range(b)]
        for name in self.present():
            value = getattr(self, name).detach().cpu()
            for i in range(b):
                rows = (i, b + i)
                records[i][name] = [pack_bits(value[r][mask[r]]) if name in _BITS
                                    else value[r][mask[r]].clone() if _PER_TOKEN[name] else value[r].clone()
                                    for r in rows]
        return records

    @classmethod
    def from_records(cls, example_ids: list[str], records: list[dict], response_mask: torch.Tensor,
                     device: torch.device | str = "cpu") -> "ReferenceOutputs":
        """Inverse of to_records for a batch with the given response mask (2B,T)."""
        b = len(example_ids)
        if len(records) != b:
            raise MisalignedOutputs(f"{len(records)} reference records for a batch of {b} pairs")
        mask = response_mask.bool().cpu()
        out = cls(example_ids=list(example_ids))
        for name in records[0] if records else []:
            rows = [records[i][name][0] for i in range(b)] + [records[i][name][1] for i in range(b)]
            if _PER_TOKEN[name]:
                lengths = mask.sum(-1).tolist()
                if name in _BITS:
                    rows = _unpack_rows(name, rows, lengths, example_ids, response_mask.dtype)
                for r, (row, n) in enumerate(zip(rows, lengths)):
                    if row.shape[0] != n:
                        side = "chosen" if r < b else "rejected"
                        raise MisalignedOutputs(
                            f"reference {name} for example {example_ids[r % b]} ({side}) has {row.shape[0]} "
                            f"tokens but the batch has {n} response tokens: the cache was built with "
                            f"different tokenisation or truncation")
                full = torch.zeros(mask.shape + rows[0].shape[1:], dtype=rows[0].dtype)
                full[mask] = torch.cat(rows) if rows else full[mask]
            else:
                full = torch.stack(rows)
            setattr(out, name, full.to(device))
        return out


def _unpack_rows(name: str, rows: list[bytes], lengths: list[int], example_ids: list[str], dtype) -> list[torch.Tensor]:
    b = len(example_ids)
    out = []
    for r, (packed, n) in enumerate(zip(rows, lengths)):
        if len(packed) != -(-n // 8):
            side = "chosen" if r < b else "rejected"
            raise MisalignedOutputs(f"reference {name} for example {example_ids[r % b]} ({side}) has {len(packed)} "
                                    f"bytes but the batch has {n} response tokens ({-(-n // 8)} bytes)")
        out.append(unpack_bits(packed, n).to(dtype if dtype.is_floating_point else torch.float32))
    return out
