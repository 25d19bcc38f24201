"""Writes tiny pretrained-encoder fixtures in FLUX.1-dev's pipeline layout, with the outputs that
the reference implementations (diffusers' AutoencoderKL, transformers' T5EncoderModel and
CLIPTextModel, the tokenizers diffusers' FluxPipeline uses) give, for the datasets crate's
`encode::Pretrained` tests:

  vae/config.json, vae/diffusion_pytorch_model.safetensors     diffusers AutoencoderKL (FLUX-like:
                                                               16 latent channels, no quant convs)
  bfl/ae.safetensors                                           the same VAE in BFL names
  text_encoder/config.json, model.safetensors                 CLIPTextModel
  text_encoder_2/config.json, model-0000N-of-00002.safetensors T5EncoderModel, sharded, with
               model.safetensors.index.json                    its index
  tokenizer/vocab.json, merges.txt, special_tokens_map.json,  CLIP BPE files as FLUX.1-dev ships
           tokenizer_config.json                              them (no tokenizer.json)
  tokenizer_2/spiece.model, tokenizer.json                     T5's sentencepiece model and the
                                                               tokenizer.json transformers makes of it
  expected.safetensors                                         pixels, latents, ids, embeddings
  captions.json                                                the captions behind the ids

Weights are random (seeded); everything is small (a few hundred KB). Usage, from the repo root,
with a Python that has torch, diffusers, transformers, tokenizers, sentencepiece and protobuf:
    python ci/encoders_fixture.py datasets/tests/fixtures/encoders
"""
import json
import os
import sys

import torch
from diffusers import AutoencoderKL
from safetensors.torch import load_file, save_file
from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as sp_pb
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTokenizer,
    CLIPTokenizerFast,
    T5Config,
    T5EncoderModel,
)

out = sys.argv[1]
torch.manual_seed(0)
T5_TOKENS = 24
CLIP_TOKENS = 16

CORPUS = [
    "a red square and a green disc on a white table",
    "two cats, a dog and a teddy bear sitting in the park",
    "photo of a woman wearing a blue hat next to a man with glasses",
    "the product shot of a ceramic mug, studio lighting, 4k",
    "A yellow duck floats; the bathtub is full of bubbles!",
] * 20
CAPTIONS = [
    "a red square and a green disc",
    "Two CATS,   a dog\tand a teddy-bear (sitting) in the park at 10am!",
    "",
    "photo of a woman wearing a blue hat next to a man with glasses in a very long caption that must be truncated",
    "ﬁne Ｆｕｌｌ width café",
]

# --- CLIP BPE files: byte alphabet, the same with </w>, learned merges, then the two specials,
# the layout of openai/clip-vit-large-patch14's vocab.json.
bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
bpe.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
bpe.pre_tokenizer = pre_tokenizers.Sequence(
    [
        pre_tokenizers.Split(
            Regex(r"""'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""),
            behavior="removed",
            invert=True,
        ),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ]
)
bpe.train_from_iterator(
    CORPUS,
    trainers.BpeTrainer(
        vocab_size=700,
        min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        end_of_word_suffix="</w>",
        show_progress=False,
    ),
)
learned = json.loads(bpe.to_str())["model"]
merges = [m if isinstance(m, str) else " ".join(m) for m in learned["merges"]]
alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
vocab = {}
for ch in alphabet:
    vocab[ch] = len(vocab)
for ch in alphabet:
    vocab[ch + "</w>"] = len(vocab)
for m in merges:
    tok = m.replace(" ", "")
    if tok not in vocab:
        vocab[tok] = len(vocab)
vocab["<|startoftext|>"] = len(vocab)
vocab["<|endoftext|>"] = len(vocab)
tok_dir = os.path.join(out, "tokenizer")
os.makedirs(tok_dir, exist_ok=True)
with open(os.path.join(tok_dir, "vocab.json"), "w") as f:
    json.dump(vocab, f)
with open(os.path.join(tok_dir, "merges.txt"), "w") as f:
    f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
# As FLUX.1-dev's tokenizer/ folder: the pad token is the end token.
clip_tok = CLIPTokenizer(
    os.path.join(tok_dir, "vocab.json"),
    os.path.join(tok_dir, "merges.txt"),
    pad_token="<|endoftext|>",
    model_max_length=CLIP_TOKENS,
)
clip_tok.save_pretrained(tok_dir)
for leftover in ["tokenizer.json", "added_tokens.json"]:
    p = os.path.join(tok_dir, leftover)
    if os.path.exists(p):
        os.remove(p)

# --- T5: a sentencepiece Unigram model (pad 0, </s> 1, <unk> 2, as T5's spiece.model) and the
# tokenizer.json transformers' T5 converter makes of it (the precompiled NFKC charsmap, runs of
# spaces to one, metaspace, `$A </s>`). The reference ids come from sentencepiece itself.
t5_dir = os.path.join(out, "tokenizer_2")
os.makedirs(t5_dir, exist_ok=True)
corpus_file = os.path.join(t5_dir, "corpus.txt")
with open(corpus_file, "w") as f:
    f.write("\n".join(CORPUS))
spm.SentencePieceTrainer.train(
    input=corpus_file, model_prefix=os.path.join(t5_dir, "spiece"), vocab_size=64,
    model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1, pad_piece="<pad>",
    eos_piece="</s>", unk_piece="<unk>", character_coverage=1.0, minloglevel=2,
)
os.remove(corpus_file)
os.remove(os.path.join(t5_dir, "spiece.vocab"))
proto = sp_pb.ModelProto()
with open(os.path.join(t5_dir, "spiece.model"), "rb") as f:
    proto.ParseFromString(f.read())
uni = Tokenizer(models.Unigram([(p.piece, p.score) for p in proto.pieces], unk_id=2))
uni.normalizer = normalizers.Sequence(
    [
        normalizers.Precompiled(proto.normalizer_spec.precompiled_charsmap),
        normalizers.Replace(Regex(" {2,}"), " "),
    ]
)
uni.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
uni.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
for t, i in [("<pad>", 0), ("</s>", 1), ("<unk>", 2)]:
    assert uni.token_to_id(t) == i, t
uni.save(os.path.join(t5_dir, "tokenizer.json"))
with open(os.path.join(t5_dir, "tokenizer_config.json"), "w") as f:
    json.dump({"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>",
               "model_max_length": T5_TOKENS, "tokenizer_class": "T5Tokenizer"}, f, indent=1)
sp = spm.SentencePieceProcessor(model_file=os.path.join(t5_dir, "spiece.model"))
t5_vocab = sp.get_piece_size()

# --- Tokenization as FluxPipeline does it (padding to max length, truncation).
clip_ids = clip_tok(
    CAPTIONS, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
).input_ids
fast = CLIPTokenizerFast(
    os.path.join(tok_dir, "vocab.json"), os.path.join(tok_dir, "merges.txt"),
    pad_token="<|endoftext|>",
)
fast_ids = fast(
    CAPTIONS, padding="max_length", max_length=CLIP_TOKENS, truncation=True, return_tensors="pt"
).input_ids
assert torch.equal(clip_ids, fast_ids), (clip_ids, fast_ids)
t5_ids = torch.tensor(
    [
        (sp.encode(c)[: T5_TOKENS - 1] + [1] + [0] * T5_TOKENS)[:T5_TOKENS]
        for c in CAPTIONS
    ]
)

# --- Models.
clip_cfg = CLIPTextConfig(
    vocab_size=len(vocab),
    hidden_size=16,  # the tiny trainer model's pooled width, so it can train with these
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    max_position_embeddings=CLIP_TOKENS,
    projection_dim=16,
    hidden_act="quick_gelu",
    bos_token_id=vocab["<|startoftext|>"],
    eos_token_id=2,  # as openai/clip-vit-large-patch14: pooled at argmax(input_ids)
    pad_token_id=1,
)
clip = CLIPTextModel(clip_cfg).eval()
clip.save_pretrained(os.path.join(out, "text_encoder"), safe_serialization=True)
# FLUX.1-dev's text_encoder/model.safetensors names tensors `text_model.*` (older transformers
# wrote that prefix; 5.x leaves it out): keep the released naming.
clip_file = os.path.join(out, "text_encoder", "model.safetensors")
clip_w = load_file(clip_file)
save_file(
    {(k if k.startswith("text_model.") else "text_model." + k): v for k, v in clip_w.items()},
    clip_file,
    metadata={"format": "pt"},
)

t5_cfg = T5Config(
    vocab_size=t5_vocab,
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    feed_forward_proj="gated-gelu",
    is_encoder_decoder=False,
    use_cache=False,
    dropout_rate=0.0,
)
t5 = T5EncoderModel(t5_cfg).eval()
t5.save_pretrained(
    os.path.join(out, "text_encoder_2"), safe_serialization=True, max_shard_size="60KB"
)
index = os.path.join(out, "text_encoder_2", "model.safetensors.index.json")
assert os.path.exists(index), "T5 should be sharded to exercise the index"

vae = AutoencoderKL(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,  # 8x down, as FLUX's
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=16,
    norm_num_groups=32,
    sample_size=32,
    scaling_factor=0.3611,
    shift_factor=0.1159,
    use_quant_conv=False,
    use_post_quant_conv=False,
).eval()
# Non-trivial norms and biases so a wrong mapping shows.
with torch.no_grad():
    for name, p in vae.named_parameters():
        if name.endswith("bias") or "norm" in name:
            p.add_(0.1 * torch.randn_like(p))
vae.save_pretrained(os.path.join(out, "vae"), safe_serialization=True)
# Only the encoder matters to us; drop the decoder to keep the fixture small.
vae_file = os.path.join(out, "vae", "diffusion_pytorch_model.safetensors")
enc = {k: v for k, v in load_file(vae_file).items() if k.startswith("encoder.")}
save_file(enc, vae_file)


def bfl_name(k):
    """diffusers VAE encoder name -> BFL ae.safetensors name (written independently of Rust's)."""
    parts = k.split(".")
    if parts[1] == "down_blocks":
        i = parts[2]
        if parts[3] == "resnets":
            rest = ".".join(parts[5:]).replace("conv_shortcut", "nin_shortcut")
            return f"encoder.down.{i}.block.{parts[4]}.{rest}"
        return f"encoder.down.{i}.downsample.{'.'.join(parts[5:])}"
    if parts[1] == "mid_block":
        if parts[2] == "resnets":
            return f"encoder.mid.block_{int(parts[3]) + 1}.{'.'.join(parts[4:])}"
        sub = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out": "proj_out"}
        leaf = parts[-1]
        return f"encoder.mid.attn_1.{sub[parts[4]]}.{leaf}"
    if parts[1] == "conv_norm_out":
        return "encoder.norm_out." + parts[2]
    return k


bfl = {}
for k, v in enc.items():
    v = v.contiguous()
    if ".attentions." in k and v.dim() == 2:
        v = v[:, :, None, None].contiguous()
    bfl[bfl_name(k)] = v
os.makedirs(os.path.join(out, "bfl"), exist_ok=True)
save_file(bfl, os.path.join(out, "bfl", "ae.safetensors"))

# --- Expected outputs.
g = torch.Generator().manual_seed(1)
pixels = torch.rand(2, 3, 32, 48, generator=g) * 2 - 1
with torch.no_grad():
    mean = vae.encode(pixels).latent_dist.mode()
    latents = (mean - vae.config.shift_factor) * vae.config.scaling_factor
    t5_out = t5(t5_ids).last_hidden_state
    pooled = clip(clip_ids).pooler_output
save_file(
    {
        "pixels": pixels.contiguous(),
        "latents": latents.contiguous(),
        "t5_ids": t5_ids.to(torch.int64).contiguous(),
        "t5": t5_out.contiguous(),
        "clip_ids": clip_ids.to(torch.int64).contiguous(),
        "pooled": pooled.contiguous(),
    },
    os.path.join(out, "expected.safetensors"),
)
with open(os.path.join(out, "captions.json"), "w") as f:
    json.dump({"captions": CAPTIONS, "t5_tokens": T5_TOKENS, "clip_tokens": CLIP_TOKENS}, f, indent=1)
print("wrote", out)
