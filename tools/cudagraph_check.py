"""Does the compiled tqpatch decode step run as a CUDA graph? Prints torch's cudagraph log lines
(skips name their reason) and the host time per step with and without the graph."""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import tqpatch  # noqa: E402
from tqpatch.cache import TurboQuantCache  # noqa: E402

torch.manual_seed(0)
cfg = LlamaConfig(vocab_size=512, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=8, num_key_value_heads=2, head_dim=128)
model = LlamaForCausalLM(cfg).to("cuda", torch.bfloat16).eval()
tqpatch.apply(model, key_bits=4, value_bits=4)
cache = TurboQuantCache(model, max_cache_len=1024, batch_size=1)
ids = torch.randint(0, 512, (1, 600), device="cuda")
with torch.no_grad():
    model(ids[:, :512], past_key_values=cache, use_cache=True)
    step = torch.compile(lambda t, p: model(t, position_ids=p, past_key_values=cache, use_cache=True).logits,
                         fullgraph=True, mode="reduce-overhead")
    times = []
    for t in range(512, 560):
        tok, pos = ids[:, t : t + 1].clone(), torch.full((1, 1), t, device="cuda")
        torch.cuda.synchronize()
        a = time.perf_counter()
        step(tok, pos)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - a)
print("median host+device ms per step (last 20):", sorted(times[-20:])[10] * 1e3)
print("cudagraph trees in use:", bool(torch._inductor.cudagraph_trees.get_container(0).tree_manager))
