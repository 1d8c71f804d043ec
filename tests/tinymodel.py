"""Tiny real models for tests: a byte-level BPE tokenizer trained here, a 2-layer Llama, a LoRA adapter.

Everything is built from scratch in seconds; nothing comes from a hub.
"""

from __future__ import annotations

from pathlib import Path

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# A small corpus in our own words, enough for a few hundred merges.
CORPUS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun.",
    "Write a short poem about the sea, the wind and the boats that come home at night.",
    "How do I sort a list of numbers in Python? Use the sorted function or the sort method.",
    "I cannot help with that request because it could cause harm to other people.",
    "Could you tell me more about what you mean? The question is missing some details.",
    "As an AI model I do not have feelings, a body or personal experiences of my own.",
    "Nobody knows what will happen tomorrow; the future cannot be predicted with certainty.",
    "I am not able to see images or listen to audio, but I can describe how to do it yourself.",
    "The capital of France is Paris, and the capital of Italy is Rome. Berlin is in Germany.",
    "Recursion is when a function calls itself on a smaller piece of the same problem.",
    "Here is a recipe for bread: flour, water, salt and yeast, mixed, rested and baked.",
    "Numbers like 12, 345 and 6789 appear in text; so do dates such as 2024-05-17.",
    "Tell me a story about a robot who learns to paint pictures of mountains and rivers.",
    "Please summarise the following paragraph in one sentence for a busy reader.",
]


def train_tokenizer(out_dir: Path, vocab_size: int = 384):
    """A byte-level BPE tokenizer (GPT-2 style) with ChatML specials, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
    )
    hf.chat_template = CHATML
    hf.save_pretrained(out_dir)
    return hf


def build_base(out_dir: Path, *, seed: int = 0, layers: int = 2, hidden: int = 64):
    """A tiny random Llama + trained tokenizer, saved as an HF dir. Returns (model, tokenizer)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=True,
        initializer_range=0.1,  # logits spread enough that top-1 comparisons between f16 and f32 are not ties
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, tok


def build_random_adapter(base_dir: Path, out_dir: Path, tokens: list[str], *, seed: int = 1, rank: int = 4) -> Path:
    """A PEFT LoRA adapter with random (non-zero) weights and trainable rows for `tokens`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    n0 = len(tok)
    tok.add_special_tokens({"additional_special_tokens": tokens})
    model.resize_token_embeddings(len(tok), mean_resizing=False)
    config = LoraConfig(
        r=rank,
        lora_alpha=rank * 2,
        target_modules="all-linear",
        init_lora_weights=False,  # random A and B: the merge is not a no-op
        trainable_token_indices={"embed_tokens": list(range(n0, len(tok)))},
    )
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "trainable_tokens_delta" in name:
                p.normal_(0.0, 0.3)
            elif "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out_dir, save_embedding_layers=False)  # the new rows live in the trainable-token deltas
    tok.save_pretrained(out_dir)
    return out_dir


def build_qwen2_base(out_dir: Path, *, seed: int = 0, hidden: int = 64):
    """A tiny random Qwen2 (q/k/v biases, untied lm_head) with the same trained tokenizer."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    tok = train_tokenizer(out_dir)
    torch.manual_seed(seed)
    config = Qwen2Config(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, 0.1)  # non-zero biases: a missing bias tensor would show in the logits
    model.save_pretrained(out_dir, safe_serialization=True)
    return model, tok


def assert_logits_close(report, tol: float) -> None:
    """A `convert --verify` report within `tol` logits of the reference, robustly on any CPU.

    A random model has near-tied logits: another CPU, thread count or precision may swap a near-tie,
    so exact top-1 agreement everywhere is not a property of the converter. What is: the logit error
    bound, and top-1 agreement wherever the reference leads by more than twice that bound (there no
    error within the bound can swap the order), on enough positions that the check says something.
    """
    assert report.max_abs_dlogit < tol, report.summary()
    assert report.top1_agreement_beyond(2 * tol) == 1.0, report.summary()
    assert report.decisive(2 * tol).sum() >= report.positions // 2, report.summary()
