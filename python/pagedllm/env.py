"""`python -m pagedllm.env`: what this pagedllm build holds and what it sees."""
import platform

import torch


def collect() -> dict:
    from pagedllm import _C, _ops  # noqa: F401 - importing _ops loads the ops

    ops = sorted(name.split("::", 1)[1] for name in torch._C._dispatch_get_all_op_names()
                 if name.startswith("_C::"))
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {
        "torch": torch.__version__,
        "torch CUDA": torch.version.cuda or "none (CPU build)",
        "CUDA kernels compiled": bool(_C.cuda_compiled),
        "CUDA arch list": _C.cuda_arch_list or "-",
        "device": device,
        "ops": ops,
    }


def main() -> None:
    info = collect()
    width = max(len(k) for k in info)
    for key, value in info.items():
        if isinstance(value, list):
            value = ", ".join(value)
        print(f"{key:<{width}}  {value}")


if __name__ == "__main__":
    main()
