"""The built-in engine adapters (open them through ``engines.registry``).

- base.py          ``Engine``: the interface every adapter implements
- mlx_style.py     shared by engines with mlx-lm's generation API
- reference.py     the reference engine
- mlx_lm.py        mlx-lm
- transformers.py  Hugging Face transformers on PyTorch
- llama_cpp.py     llama.cpp through llama-cpp-python (GGUF models only)
- cmd.py           any program speaking the JSON-lines protocol (``cmd:``)
- line_process.py  the child process behind ``cmd:``: lines in, lines out, deadlines
"""
