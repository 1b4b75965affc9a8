"""The demo world's tokenizer and SFT model: a locally trained BPE tokenizer wrapped as a transformers
fast tokenizer (with the demo's text convention, see `sparsepo.demo.world`), and a tiny random-init
Llama trained with next-token cross-entropy on the synthetic corpus."""

from __future__ import annotations

import math
import string

import torch

from sparsepo.demo.sizes import WorldSize

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"

CHAT_TEMPLATE = (
    "{#- demo convention: bos + prompt + ' ' + response + eos; no role headers -#}"
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if not loop.first %} {% endif -%}"
    "{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' %}{{ eos_token }}{% endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{#- the response follows the prompt directly -#}{%- endif -%}"
)


def build_tokenizer(texts: list[str], vocab_size: int, max_length: int):
    """A BPE tokenizer trained on `texts`, wrapped as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=True),
        pre_tokenizers.Punctuation(behavior="isolated"),
    ])
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[PAD, BOS, EOS, UNK], show_progress=False,
        initial_alphabet=list(string.ascii_letters + string.digits + string.punctuation) + ["▁"],
    )
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, tok.token_to_id(BOS))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD,
                                 unk_token=UNK, model_max_length=max_length, padding_side="right",
                                 clean_up_tokenization_spaces=False)
    hf.chat_template = CHAT_TEMPLATE
    return hf


def check_tokenizer(tokenizer, examples: list[tuple[str, str]]) -> None:
    """The joining convention holds: separate = joint tokenisation, response decode round-trips."""
    for prompt, response in examples:
        p = tokenizer(prompt)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if p[:1] != [tokenizer.bos_token_id]:
            raise RuntimeError("demo tokenizer does not start prompts with bos")
        if tokenizer(prompt + " " + response)["input_ids"] != p + r:
            raise RuntimeError(f"demo tokenizer: prompt/response tokenisation is not stable for {prompt!r} {response!r}")
        if tokenizer.decode(r, skip_special_tokens=True) != response:
            raise RuntimeError(f"demo tokenizer does not round-trip {response!r}")
        chat = tokenizer.apply_chat_template([{"role": "user", "content": prompt},
                                              {"role": "assistant", "content": response}], tokenize=False)
        if tokenizer(chat, add_special_tokens=False)["input_ids"] != p + r + [tokenizer.eos_token_id]:
            raise RuntimeError("demo chat template disagrees with the joining convention")


def encode_examples(tokenizer, examples: list[tuple[str, str]]) -> list[list[int]]:
    """bos + prompt + response + eos ids per (prompt, response): the demo convention."""
    prompts = tokenizer([p for p, _ in examples])["input_ids"]
    responses = tokenizer([r for _, r in examples], add_special_tokens=False)["input_ids"]
    return [p + r + [tokenizer.eos_token_id] for p, r in zip(prompts, responses)]


def build_model(size: WorldSize, tokenizer):
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=size.hidden_size, intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers, num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads, max_position_embeddings=size.max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                               eos_token_id=tokenizer.eos_token_id,
                                               pad_token_id=tokenizer.pad_token_id)
    return model


def _pad_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        mask[i, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


def train_sft(model, train: list[list[int]], held_out: list[list[int]], size: WorldSize, *, pad_id: int,
              seed: int, progress: bool) -> dict:
    """Next-token cross-entropy on whole sequences (bos + prompt + response + eos), AdamW, cosine LR."""
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=size.sft_lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, size.sft_steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, size.sft_steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    model.train()
    losses: list[float] = []
    bar = tqdm(range(size.sft_steps), desc="sft", disable=not progress, leave=False, dynamic_ncols=True)
    for step in bar:
        idx = torch.randint(len(train), (size.sft_batch_size,), generator=gen).tolist()
        ids, _, labels = _pad_batch([train[i] for i in idx], pad_id)
        # right padding + causal attention: real tokens never see the pads, whose labels are -100, so
        # no attention mask is needed (and SDPA keeps its fast causal path)
        loss = model(input_ids=ids, labels=labels, use_cache=False).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    model.eval()
    tail = losses[-max(1, len(losses) // 10):]
    with torch.no_grad():
        total = count = 0.0
        for s in range(0, len(held_out), 128):
            ids, _, labels = _pad_batch(held_out[s:s + 128], pad_id)
            n = int((labels[:, 1:] != -100).sum())
            total += model(input_ids=ids, labels=labels, use_cache=False).loss.item() * n
            count += n
    return {"sft_first_loss": round(losses[0], 4), "sft_final_loss": round(sum(tail) / len(tail), 4),
            "sft_eval_loss": round(total / max(1.0, count), 4), "sft_steps": len(losses)}
