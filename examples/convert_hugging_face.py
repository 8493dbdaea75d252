"""Convert a Hugging Face Llama (built from a small config: nothing is downloaded) to normlab
and check that the converted model computes the same logits and gradients.

    pip install transformers && python examples/convert_hugging_face.py
"""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import normlab

config = LlamaConfig(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
torch.manual_seed(0)
model = LlamaForCausalLM(config)

converted, summary = normlab.convert(model, strict=True)  # strict: raise if a norm is left
print(summary)

ids = torch.randint(0, config.vocab_size, (2, 16))
for m in (model, converted):
    m(input_ids=ids, labels=ids).loss.backward()
same_logits = torch.allclose(
    model(input_ids=ids).logits, converted(input_ids=ids).logits, atol=1e-5, rtol=1e-5
)
same_grads = all(
    torch.allclose(a.grad, b.grad, atol=1e-4, rtol=1e-4)
    for a, b in zip(model.parameters(), converted.parameters(), strict=True)
)
print(f"same logits: {same_logits}, same gradients: {same_grads}")
