"""Batch collation for HyperDAS.

Records are dicts:
    base_prompt (str), counterfactual_prompt (str), concept (str),
    label (str; may be empty for inference), is_causal (bool),
    optional base_entity_pos / source_entity_pos (int token index of the entity's last
    token, -1 unknown), optional base_prefix / counterfactual_prefix (the prompt text up to
    and including the entity; used to compute the entity positions when not given).

The batch (all right-padded):
    base_input_ids, base_attention_mask [B, T]  base prompt followed by the label tokens
    base_intervention_mask [B, T] bool          True on base-prompt tokens only
    labels [B, T]                               -100 except at t where logits[t] must
                                                predict a label token (already shifted)
    source_input_ids, source_attention_mask [B, S]
    concept_input_ids, concept_attention_mask [B, C]
    is_causal [B] bool, base_entity_pos [B], source_entity_pos [B] long (-1 unknown)

Label spacing: with ``label_space="auto"`` a space is put before the label when the
prompt ends in neither whitespace nor an opening quote/bracket (``country:`` + `` France``,
but ``"country": "`` + ``France``).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

IGNORE_INDEX = -100
_NO_SPACE_AFTER = ("\"", "'", "(", "[", "{", "`")


class HyperDASCollator:
    """Callable turning a list of records into the batch dict described in the module docstring.

    Args:
        tokenizer: a Hugging Face tokenizer (needs a pad token; eos is used if missing).
        max_length: optional cap on each prompt's token count (longer prompts are cut on the
            left; entity positions move with them, -1 where the entity was cut off; labels
            are not cut, see max_label_tokens).
        label_space: "auto", True (always prepend a space) or False (never).
        max_label_tokens: optional cap on label tokens kept for teacher forcing.
    """

    def __init__(self, tokenizer, max_length: Optional[int] = None, label_space="auto",
                 max_label_tokens: Optional[int] = None):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.label_space = label_space
        self.max_label_tokens = max_label_tokens
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither a pad_token nor an eos_token to pad with")
        self.pad_id = int(pad)

    def _ids(self, text: str, special: bool = True) -> List[int]:
        """The prompt's tokens, cut on the left to max_length (see _cut)."""
        return self._cut(self._tokens(text, special))[0]

    def _tokens(self, text: str, special: bool = True) -> List[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _cut(self, ids: List[int]) -> Tuple[List[int], int]:
        """(ids cut on the left to max_length, how many tokens were dropped): positions in
        the full prompt move left by that many."""
        if self.max_length is not None and len(ids) > self.max_length:
            return ids[-self.max_length:], len(ids) - self.max_length
        return ids, 0

    def _label_text(self, prompt: str, label: str) -> str:
        if not label:
            return ""
        space = self.label_space
        if space == "auto":
            space = not (label[0].isspace() or prompt[-1:].isspace() or prompt.endswith(_NO_SPACE_AFTER))
        return (" " + label) if space else label

    def _entity_pos(self, record: Dict[str, Any], key: str, prefix_key: str, prompt_len: int, dropped: int) -> int:
        """The entity's last token in the (cut) prompt: a position given in the record, or the
        last token of its prefix, both counted in the full prompt and moved left by the
        ``dropped`` tokens; -1 when there is none or it was cut off."""
        value = record.get(key)
        if value is not None:
            pos = int(value)
        else:
            prefix = record.get(prefix_key)
            if not prefix:
                return -1
            pos = len(self._tokens(prefix)) - 1
        if pos < 0:
            return -1
        pos -= dropped
        return pos if 0 <= pos < prompt_len else -1

    @staticmethod
    def _check_text(record: Dict[str, Any], key: str, index: int) -> str:
        value = record.get(key)
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"record {index}: {key} must be a non-empty string, got {value!r}")
        return value

    def __call__(self, records: Sequence[Dict[str, Any]]) -> Dict[str, torch.Tensor]:
        if len(records) == 0:
            raise ValueError("records must be a non-empty list of dicts")
        base_rows, inter_rows, label_rows, source_rows, concept_rows = [], [], [], [], []
        causal, base_pos, source_pos = [], [], []
        for i, record in enumerate(records):
            base_prompt = self._check_text(record, "base_prompt", i)
            cf_prompt = self._check_text(record, "counterfactual_prompt", i)
            concept = self._check_text(record, "concept", i)
            label = record.get("label") or ""
            prompt_ids, base_dropped = self._cut(self._tokens(base_prompt))
            # the label is never cut on the left (max_label_tokens keeps its first tokens)
            label_ids = self._tokens(self._label_text(base_prompt, label), special=False) if label else []
            if self.max_label_tokens is not None:
                label_ids = label_ids[: self.max_label_tokens]
            ids = prompt_ids + label_ids
            base_rows.append(ids)
            inter_rows.append([True] * len(prompt_ids) + [False] * len(label_ids))
            # logits[t] predicts ids[t + 1]: the label token j sits at len(prompt)+j, predicted at len(prompt)+j-1.
            lab = [IGNORE_INDEX] * len(ids)
            for j, tok in enumerate(label_ids):
                lab[len(prompt_ids) + j - 1] = tok
            label_rows.append(lab)
            src, source_dropped = self._cut(self._tokens(cf_prompt))
            source_rows.append(src)
            concept_rows.append(self._ids(concept))
            causal.append(bool(record.get("is_causal", True)))
            base_pos.append(self._entity_pos(record, "base_entity_pos", "base_prefix", len(prompt_ids), base_dropped))
            source_pos.append(self._entity_pos(record, "source_entity_pos", "counterfactual_prefix", len(src),
                                               source_dropped))

        def pad(rows, value, dtype=torch.long):
            width = max(len(r) for r in rows)
            out = torch.full((len(rows), width), value, dtype=dtype)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, r in enumerate(rows):
                out[i, : len(r)] = torch.tensor(r, dtype=dtype)
                mask[i, : len(r)] = 1
            return out, mask

        base_ids, base_mask = pad(base_rows, self.pad_id)
        inter, _ = pad(inter_rows, False, torch.bool)
        labels, _ = pad(label_rows, IGNORE_INDEX)
        source_ids, source_mask = pad(source_rows, self.pad_id)
        concept_ids, concept_mask = pad(concept_rows, self.pad_id)
        return {
            "base_input_ids": base_ids,
            "base_attention_mask": base_mask,
            "base_intervention_mask": inter,
            "labels": labels,
            "source_input_ids": source_ids,
            "source_attention_mask": source_mask,
            "concept_input_ids": concept_ids,
            "concept_attention_mask": concept_mask,
            "is_causal": torch.tensor(causal, dtype=torch.bool),
            "base_entity_pos": torch.tensor(base_pos, dtype=torch.long),
            "source_entity_pos": torch.tensor(source_pos, dtype=torch.long),
        }


__all__ = ["HyperDASCollator", "IGNORE_INDEX"]
