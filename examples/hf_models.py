"""Hugging Face transformers models built from their configs (random weights, no download).

Nine families, each in two sizes: ``tiny`` (hidden 32, 2 layers, batch 2, sequence 8: for
tests) and ``base`` (the published architecture: BERT-base, DistilBERT, GPT-2, T5-small,
BART-base, ViT-base, a small Llama, a small Mistral, Whisper-tiny; batch 2, sequence 64).
Every factory returns ``(model in eval mode, keyword inputs)``, as ``partitioner compile``
takes them::

    partitioner compile examples/hf_models.py:bert --out out/bert
    partitioner run out/bert --check

``bert``, ``gpt2``... are the tiny factories; ``bert_base``, ``gpt2_base``... the full-size ones;
:func:`build` takes any size, batch and sequence length.
"""

from __future__ import annotations

import torch

#: model name -> family (what the tests call a family)
FAMILIES = {"bert": "encoder", "distilbert": "encoder", "gpt2": "decoder", "t5": "encoder-decoder",
            "bart": "encoder-decoder", "vit": "vision", "llama": "decoder", "mistral": "decoder",
            "whisper": "speech"}
NAMES = tuple(FAMILIES)

# hidden size, layers, heads, feed-forward size, vocabulary
_SIZES = {
    "tiny": {"h": 32, "l": 2, "heads": 2, "ff": 64, "vocab": 100, "batch": 2, "seq": 8},
    "base": {"batch": 2, "seq": 64},
}


def build(name: str, size: str = "tiny", batch: int | None = None, seq: int | None = None, seed: int = 0):
    """``(model, inputs)`` of family ``name`` at ``size`` (``"tiny"`` or ``"base"``).

    Parameters
    ----------
    name : str
        One of :data:`NAMES`.
    size : {"tiny", "base"}
    batch, seq : int, optional
        Batch size and sequence length (default: 2 and 8 for tiny, 2 and 64 for base). ViT
        takes images (32x32 tiny, 224x224 base) and Whisper mel spectrograms (16 frames tiny,
        3000 base) whatever ``seq``; their decoders (Whisper) take ``seq`` tokens.
    seed : int
        Seeds the random weights and inputs.
    """
    import transformers as T

    if name not in FAMILIES:
        raise ValueError(f"unknown model {name!r}; one of {', '.join(NAMES)}")
    s = _SIZES[size]
    batch = batch or s["batch"]
    seq = seq or s["seq"]
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    tiny = size == "tiny"
    vocab = s.get("vocab", 32000)

    def ids(n, v=vocab):
        return torch.randint(0, v, (batch, n), generator=g)

    def text(v=vocab):
        return {"input_ids": ids(seq, v), "attention_mask": torch.ones(batch, seq, dtype=torch.long)}

    if name == "bert":
        cfg = (T.BertConfig(vocab_size=vocab, hidden_size=s["h"], num_hidden_layers=s["l"],
                            num_attention_heads=s["heads"], intermediate_size=s["ff"], max_position_embeddings=64)
               if tiny else T.BertConfig())  # bert-base-uncased: 768, 12 layers, 12 heads
        model, inputs = T.BertModel(cfg), text(cfg.vocab_size)
    elif name == "distilbert":
        cfg = (T.DistilBertConfig(vocab_size=vocab, dim=s["h"], n_layers=s["l"], n_heads=s["heads"],
                                  hidden_dim=s["ff"], max_position_embeddings=64)
               if tiny else T.DistilBertConfig())  # distilbert-base: 768, 6 layers
        model, inputs = T.DistilBertModel(cfg), text(cfg.vocab_size)
    elif name == "gpt2":
        cfg = (T.GPT2Config(vocab_size=vocab, n_embd=s["h"], n_layer=s["l"], n_head=s["heads"], n_positions=64,
                            bos_token_id=0, eos_token_id=0)
               if tiny else T.GPT2Config())  # gpt2 (124M): 768, 12 layers
        model, inputs = T.GPT2LMHeadModel(cfg), text(cfg.vocab_size)
    elif name == "t5":
        cfg = (T.T5Config(vocab_size=vocab, d_model=s["h"], d_kv=s["h"] // s["heads"], d_ff=s["ff"],
                          num_layers=s["l"], num_heads=s["heads"])
               if tiny else T.T5Config(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_heads=8))  # t5-small
        model = T.T5Model(cfg)
        inputs = dict(text(cfg.vocab_size), decoder_input_ids=ids(max(1, seq // 2), cfg.vocab_size))
    elif name == "bart":
        cfg = (T.BartConfig(vocab_size=vocab, d_model=s["h"], encoder_layers=s["l"], decoder_layers=s["l"],
                            encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"],
                            encoder_ffn_dim=s["ff"], decoder_ffn_dim=s["ff"], max_position_embeddings=64)
               if tiny else  # bart-base: 768 wide, 6 + 6 layers, 12 heads
               T.BartConfig(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                            decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072))
        model = T.BartModel(cfg)
        inputs = dict(text(cfg.vocab_size), decoder_input_ids=ids(max(1, seq // 2), cfg.vocab_size))
    elif name == "vit":
        cfg = (T.ViTConfig(hidden_size=s["h"], num_hidden_layers=s["l"], num_attention_heads=s["heads"],
                           intermediate_size=s["ff"], image_size=32, patch_size=8)
               if tiny else T.ViTConfig())  # vit-base-patch16-224
        model = T.ViTModel(cfg)
        inputs = {"pixel_values": torch.randn(batch, 3, cfg.image_size, cfg.image_size, generator=g)}
    elif name in ("llama", "mistral"):
        common = (dict(vocab_size=vocab, hidden_size=s["h"], intermediate_size=s["ff"], num_hidden_layers=s["l"],
                       num_attention_heads=s["heads"], num_key_value_heads=1, max_position_embeddings=64)
                  if tiny else  # small: 512 wide, 8 layers, 8 heads (2 key/value heads), 32k vocabulary
                  dict(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                       num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048))
        if name == "llama":
            model = T.LlamaForCausalLM(T.LlamaConfig(**common))
        else:  # Mistral's sliding window stays at its default (4096)
            model = T.MistralForCausalLM(T.MistralConfig(**common))
        inputs = text(common["vocab_size"])
    else:  # whisper
        tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1)
        cfg = (T.WhisperConfig(vocab_size=vocab, d_model=s["h"], encoder_layers=s["l"], decoder_layers=s["l"],
                               encoder_attention_heads=s["heads"], decoder_attention_heads=s["heads"],
                               encoder_ffn_dim=s["ff"], decoder_ffn_dim=s["ff"], num_mel_bins=8,
                               max_source_positions=8, max_target_positions=16, **tokens)
               if tiny else T.WhisperConfig(d_model=384, encoder_layers=4, decoder_layers=4,
                                            encoder_attention_heads=6, decoder_attention_heads=6,
                                            encoder_ffn_dim=1536, decoder_ffn_dim=1536))  # whisper-tiny
        model = T.WhisperModel(cfg)
        frames = 2 * cfg.max_source_positions
        inputs = {"input_features": torch.randn(batch, cfg.num_mel_bins, frames, generator=g),
                  "decoder_input_ids": ids(min(seq, cfg.max_target_positions), cfg.vocab_size)}
    return model.eval(), inputs


def _factory(name: str, size: str):
    def factory():
        return build(name, size)

    factory.__name__ = name if size == "tiny" else f"{name}_{size}"
    factory.__doc__ = f"{name} ({size}): ``(model, keyword inputs)``."
    return factory


for _n in NAMES:
    globals()[_n] = _factory(_n, "tiny")
    globals()[f"{_n}_base"] = _factory(_n, "base")

__all__ = ["FAMILIES", "NAMES", "build", *NAMES, *(f"{n}_base" for n in NAMES)]
