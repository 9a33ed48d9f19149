"""`python -m phitune.export.llama_quantize IN OUT QUANT THREADS`: llama.cpp's quantizer
(`llama_model_quantize`, through llama-cpp-python) on one GGUF file. Run in a child process by
phitune.export.gguf: the quantizer logs to stderr and runs native code."""

from __future__ import annotations

import sys


def main(argv: list[str]) -> int:
    import ctypes

    import gguf
    import llama_cpp

    source, target, quant, threads = argv
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(getattr(gguf.LlamaFileType, "MOSTLY_" + quant.upper()))
    params.nthread = int(threads)
    status = llama_cpp.llama_model_quantize(source.encode(), target.encode(), ctypes.byref(params))
    if status != 0:
        print(f"llama_model_quantize returned {status}", file=sys.stderr)
    return 0 if status == 0 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
