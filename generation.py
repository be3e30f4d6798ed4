"""Generation backends of qg_vllm.py and title_vllm.py: vLLM on GPU nodes, transformers `generate`
elsewhere, with the same sampling settings. Prompts come in as token-id lists (the chat template
applied by lm.chat_prompt_ids)."""
import logging

import torch
from tqdm.auto import tqdm

import lm

log = logging.getLogger("generation")


class HFGenerator:
    """Batched sampling with transformers `generate` (the CPU / no-vLLM backend)."""

    name = "transformers"

    def __init__(self, model_path, batch_size=32, seed=0):
        self.model, self.tokenizer = lm.load_model(model_path, device="cuda" if lm.cuda_available() else "cpu")
        self.model.eval()
        self.batch_size, self.seed = batch_size, seed

    @torch.no_grad()
    def generate(self, prompts, n=1, temperature=1.0, max_tokens=64, top_p=1.0, top_k=0, desc="generate"):
        """For each prompt (a list of token ids), `n` sampled completions as text."""
        from transformers import GenerationConfig

        torch.manual_seed(self.seed)
        # A static (preallocated) KV cache: the default dynamic one re-copies the cache at every step.
        config = GenerationConfig(do_sample=temperature > 0, temperature=temperature if temperature > 0 else None,
                                  top_p=top_p, top_k=top_k, max_new_tokens=max_tokens, num_return_sequences=n,
                                  pad_token_id=self.tokenizer.pad_token_id, cache_implementation="static",
                                  eos_token_id=self.model.generation_config.eos_token_id or self.tokenizer.eos_token_id)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        outputs = [None] * len(prompts)
        pad = self.tokenizer.pad_token_id
        device = self.model.device
        for start in tqdm(range(0, len(order), self.batch_size), desc=desc, dynamic_ncols=True):
            idx = order[start:start + self.batch_size]
            ids, mask = lm.pad_rows([prompts[i] for i in idx], pad, left=True)
            width = ids.shape[1]
            out = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=config)
            texts = self.tokenizer.batch_decode(out[:, width:], skip_special_tokens=True)
            for row, i in enumerate(idx):
                outputs[i] = [t.strip() for t in texts[row * n:(row + 1) * n]]
        return outputs


class VLLMGenerator:
    """Sampling with vLLM: one engine per process, prompts passed as token ids."""

    name = "vllm"

    def __init__(self, model_path, seed=0, gpu_memory_utilization=None, max_model_len=1024, dtype="bfloat16"):
        import vllm

        self.vllm = vllm
        memory = {} if gpu_memory_utilization is None else {"gpu_memory_utilization": gpu_memory_utilization}
        self.llm = vllm.LLM(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len, **memory)

    def generate(self, prompts, n=1, temperature=1.0, max_tokens=64, top_p=1.0, top_k=0, desc="generate"):
        params = {"n": n, "temperature": temperature, "max_tokens": max_tokens, "top_p": top_p}
        if top_k > 0:
            params["top_k"] = top_k
        sampling = self.vllm.SamplingParams(**params)
        outputs = self.llm.generate([{"prompt_token_ids": list(p)} for p in prompts], sampling)
        return [[o.text.strip() for o in out.outputs] for out in outputs]


def make_generator(model_path, backend="auto", batch_size=32, seed=0, gpu_memory_utilization=None):
    """vLLM when it is installed and a GPU is present (or when asked for), else transformers."""
    import devices

    gpu = devices.gpu_available()  # without initialising CUDA, which would break vLLM's engine start
    if backend == "auto":
        backend = "vllm" if gpu and lm.has_package("vllm") else "transformers"
    if backend == "vllm":  # float32 on a CPU build of vLLM: bf16 is emulated on many processors
        gen = VLLMGenerator(model_path, seed, gpu_memory_utilization, dtype="bfloat16" if gpu else "float32")
    elif backend == "transformers":
        gen = HFGenerator(model_path, batch_size=batch_size, seed=seed)
    else:
        raise ValueError(f"unknown generation backend '{backend}' (auto, vllm, transformers)")
    log.info("generation backend: %s", gen.name)
    return gen
