"""The real pretrained model fixture (SmolLM2-135M-Instruct): transformers alone loads it, its
shape is the documented one, and it is a working language model, not random weights."""

from __future__ import annotations

import torch

# Mean next-token loss of this sentence: 2.81 nats for SmolLM2-135M, ~11.0 with random weights.
SENTENCE = "The Roman Empire was ruled by emperors, and its capital was the city of Rome, in Italy."
MAX_LOSS = 4.0


def test_smollm2_fixture_is_a_working_pretrained_llama(smollm2_hf):
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(smollm2_hf).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_hf)
    cfg = model.config
    shape = {
        "num_hidden_layers": 30,
        "hidden_size": 576,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "head_dim": 64,
        "intermediate_size": 1536,
        "vocab_size": 49152,
        "tie_word_embeddings": True,
    }
    assert {k: getattr(cfg, k) for k in shape} == shape
    assert cfg.rope_parameters["rope_theta"] == 100000.0
    assert getattr(cfg, "quantization_config", None) is None
    assert model.dtype == torch.float32
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (1, 2, 2)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # batch-1 inference: 2 OpenMP threads are 10x slower on a busy box
    try:
        with torch.inference_mode():
            ids = tok(SENTENCE, return_tensors="pt").input_ids
            loss = model(ids, labels=ids).loss.item()
            prompt = tok("The history of the Roman Empire", return_tensors="pt")
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    finally:
        torch.set_num_threads(threads)
    assert loss < MAX_LOSS, f"mean next-token loss {loss:.2f} nats"
    new = out[0, prompt.input_ids.shape[1] :].tolist()
    text = tok.decode(new, skip_special_tokens=True)
    # greedy decoding of random or broken weights repeats a few tokens; this text does not
    assert len(new) >= 8 and len(set(new)) >= 8, (new, text)
    assert sum(w.isalpha() for w in text.split()) >= 5, text
