"""normlab.convert on Hugging Face transformers models built from small configs (random
weights, no download): every norm of the model is converted (or refused with a reason), and
logits and parameter gradients equal the original's. transformers is a test-only dependency.
"""

import pytest
import torch

import normlab
from tolerances import grad_tol, tol

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 97
DECODER = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# architecture -> (config class, config arguments, the norm classes it must hold,
# whether they scale by (1 + weight), the normlab class each becomes)
ARCHITECTURES = {
    "llama": ("LlamaConfig", DECODER, {"LlamaRMSNorm"}, False, normlab.RMSNorm),
    "gemma": ("GemmaConfig", {**DECODER, "head_dim": 8}, {"GemmaRMSNorm"}, True, normlab.RMSNorm),
    "gemma2": (
        "Gemma2Config",
        {**DECODER, "head_dim": 8, "sliding_window": 8},
        {"Gemma2RMSNorm"},
        True,
        normlab.RMSNorm,
    ),
    "gemma3": (
        "Gemma3TextConfig",
        {**DECODER, "head_dim": 8, "sliding_window": 8},
        {"Gemma3RMSNorm"},
        True,
        normlab.RMSNorm,
    ),
    "cohere": ("CohereConfig", DECODER, {"CohereLayerNorm"}, False, normlab.LayerNorm),
    "olmo": ("OlmoConfig", DECODER, {"OlmoLayerNorm"}, False, normlab.LayerNorm),
    "nemotron": (
        "NemotronConfig",
        {**DECODER, "head_dim": 8},
        {"NemotronLayerNorm1P"},
        True,
        normlab.LayerNorm,
    ),
    "bert": (
        "BertConfig",
        {k: DECODER[k] for k in ("vocab_size", "hidden_size", "intermediate_size")}
        | {"num_hidden_layers": 2, "num_attention_heads": 4},
        {"LayerNorm"},
        False,
        normlab.LayerNorm,
    ),
    "t5": (
        "T5Config",
        dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4),
        {"T5LayerNorm"},
        False,
        normlab.RMSNorm,
    ),
}


def build(arch: str):
    config_name, kwargs, norm_classes, offset, target = ARCHITECTURES[arch]
    config = getattr(transformers, config_name)(**kwargs)
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    torch.manual_seed(0)
    if arch == "t5":
        model = transformers.T5ForConditionalGeneration(config)
    elif arch == "bert":
        model = transformers.BertForMaskedLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norm weights away from 1 (and 0), so a lost offset would show
        for module in model.modules():
            if is_source_norm(module, norm_classes):
                for p in module.parameters(recurse=False):
                    p.normal_(0.0, 0.5)
    return model, norm_classes, offset, target


def is_source_norm(module, norm_classes) -> bool:
    cls = type(module)
    return cls.__name__ in norm_classes and not cls.__module__.startswith("normlab")


def run(model, ids):
    kwargs = {"input_ids": ids, "labels": ids}
    if model.config.is_encoder_decoder:
        kwargs["decoder_input_ids"] = ids
    out = model(**kwargs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), grads


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_hugging_face_model_converts_exactly(arch):
    """By default; the (1 + weight) norms of Gemma and Nemotron become offset=1.0 ones."""
    model, norm_classes, offset, target = build(arch)
    model.train()
    converted, summary = normlab.convert(model, strict=True)
    count = sum(is_source_norm(m, norm_classes) for m in model.modules())
    assert count > 0 and len(summary.converted) == count
    assert not any(is_source_norm(m, norm_classes) for m in converted.modules())
    new_norms = [m for m in converted.modules() if type(m) is target]
    assert len(new_norms) == count
    assert all(m.offset == (1.0 if offset else 0.0) for m in new_norms)
    # same parameter names and values: checkpoints load both ways as they are
    state, new_state = model.state_dict(), converted.state_dict()
    assert list(new_state) == list(state)
    for name, value in state.items():
        assert torch.equal(new_state[name], value), name
    converted.load_state_dict(state)
    ids = torch.randint(3, VOCAB, (2, 11))
    logits, grads = run(model, ids)
    new_logits, new_grads = run(converted, ids)
    torch.testing.assert_close(new_logits, logits, **tol(torch.float32))
    assert new_grads.keys() == grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(new_grads[name], grad, **grad_tol(torch.float32), msg=name)


OFFSET_ARCHITECTURES = [arch for arch, spec in ARCHITECTURES.items() if spec[3]]


@pytest.mark.parametrize("arch", OFFSET_ARCHITECTURES)
def test_offset_norms_fold_on_request(arch):
    """fold_offset=True: plain norms holding 1 + weight, the same logits."""
    model, norm_classes, _, target = build(arch)
    model.eval()
    folded, summary = normlab.convert(model, fold_offset=True, strict=True)
    count = sum(is_source_norm(m, norm_classes) for m in model.modules())
    assert len(summary.converted) == count > 0
    assert all("folded" in e.reason for e in summary.converted)
    norms = [m for m in folded.modules() if type(m) is target]
    assert len(norms) == count and all(m.offset == 0.0 for m in norms)
    originals = {n: m for n, m in model.named_modules() if is_source_norm(m, norm_classes)}
    for name, module in folded.named_modules():
        if name in originals:
            torch.testing.assert_close(module.weight, originals[name].weight + 1)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(
            folded(input_ids=ids).logits, model(input_ids=ids).logits, **tol(torch.float32)
        )


@pytest.mark.parametrize("arch", OFFSET_ARCHITECTURES)
def test_offset_norms_in_bfloat16_compute_as_the_original(arch):
    """A bfloat16 model converted by default: the norms scale by 1 + weight in float32 and
    round once, as Gemma's do, so the logits equal the original's within bfloat16's
    tolerance (and each norm's output within one rounding)."""
    model, norm_classes, _, _ = build(arch)
    model = model.to(torch.bfloat16).eval()
    converted, _ = normlab.convert(model, strict=True)
    ids = torch.randint(3, VOCAB, (2, 11))
    with torch.no_grad():
        want = model(input_ids=ids).logits
        got = converted(input_ids=ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want.float(), **tol(torch.bfloat16))
    source = next(m for m in model.modules() if is_source_norm(m, norm_classes))
    new = normlab.convert(source)[0]
    x = torch.randn(4, 7, source.weight.numel()).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(new(x), source(x), **tol(torch.bfloat16))


def test_offset_model_to_torch_leaves_the_offset_norms():
    """torch.nn has no offset norm: to="torch" leaves them, with the reason."""
    model, norm_classes, _, _ = build("gemma")
    converted, _ = normlab.convert(model)
    _, summary = normlab.convert(converted, to="torch")
    count = sum(is_source_norm(m, norm_classes) for m in model.modules())
    assert summary.converted == [] and len(summary.skipped) == count
    assert all("has no offset" in e.reason for e in summary.skipped)
    with pytest.raises(ValueError, match="cannot be converted"):
        normlab.convert(converted, to="torch", strict=True)


def test_round_trip_to_torch_keeps_the_model():
    model, *_ = build("bert")
    model.eval()
    ids = torch.randint(3, VOCAB, (2, 11))
    converted, _ = normlab.convert(model)
    back, summary = normlab.convert(converted, to="torch")
    assert len(summary.converted) == 6 and not summary.skipped
    assert back.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        torch.testing.assert_close(back(input_ids=ids).logits, model(input_ids=ids).logits)
