"""The export of a merged model to the files local runtimes read: GGUF for llama.cpp, Ollama and
LM Studio (docs/DESIGN.md, "GGUF export").

`gguf_arch` names the tensors and writes the metadata per architecture, `gguf_vocab` the
tokenizer, `gguf_write` streams the tensors into the file (and runs `llama-quantize` for
K-quants), `modelfile` writes Ollama's Modelfile, `gguf_verify` loads the file back with
transformers and compares logits and token ids. Depends on gguf, torch, transformers and
safetensors only; nothing else of Baton's.
"""
