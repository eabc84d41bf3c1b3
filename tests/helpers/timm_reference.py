"""Runs a randomly initialised timm model in a separate process and saves a reference.

Why a subprocess: importing torchvision (which timm imports) after TensorFlow segfaults in the
pinned toolchain, and kdflax tests import TensorFlow. The reference process imports PyTorch and
timm only.

    ref = timm_reference(tmp_path, 'mobilenetv3_large_100', num_classes=10, image_size=224,
                         hooks=['blocks.1', 'blocks.2', 'blocks.4', 'blocks.6'])
    ref.checkpoint          # .safetensors (and ref.pth_checkpoint: the same weights as .pth)
    ref.image               # (B, H, W, 3) float32 in [0, 1]: what kdflax models take
    ref.logits              # (B, num_classes), eval mode
    ref.hooks['blocks.1']   # the hooked module's output, exactly as PyTorch returns it

The timm model is fed `(image - mean) / std` in NCHW, using the model's own pretrained config.
BatchNorm running statistics are randomised too, so that parity covers them. With
`calibrate_bn=True` they are instead the statistics of the reference batch itself (still
arbitrary per channel, and the eval-mode net then normalises like a trained one): a deep random
BatchNorm net (MobileNetV3-Large) otherwise reaches activations of ~100, where float32 rounding
alone exceeds a 1e-4 tolerance.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib

import numpy as np


@dataclasses.dataclass
class Reference:
  checkpoint: pathlib.Path
  pth_checkpoint: pathlib.Path
  image: np.ndarray
  logits: np.ndarray
  hooks: dict[str, np.ndarray]
  num_params: int


def timm_reference(tmp_path: pathlib.Path, model: str, num_classes: int, image_size: int,
                   hooks: tuple[str, ...] | list[str] = (), kwargs: dict | None = None,
                   batch: int = 2, seed: int = 0, hf_swin: bool = False,
                   calibrate_bn: bool = False, extra_args: list[str] = ()) -> Reference:
  """Creates, runs and saves a timm model (or, with `hf_swin`, an HF transformers Swin).

  `extra_args`: more flags of the reference process (`--weights_by_order`, `--mean_std`).
  """
  out = pathlib.Path(tmp_path) / f'ref_{model}_{seed}'
  out.mkdir(parents=True, exist_ok=True)
  args = ['--model', model, '--num_classes', str(num_classes),
          '--image_size', str(image_size), '--out', str(out), '--batch', str(batch),
          '--seed', str(seed), '--kwargs', json.dumps(kwargs or {}), '--hooks', *hooks]
  if hf_swin:
    args.append('--hf_swin')
  if calibrate_bn:
    args.append('--calibrate_bn')
  args += list(extra_args)
  from helpers.torch_child import run_torch_child
  run_torch_child(__file__, args, 'timm reference')
  data = np.load(out / 'reference.npz')
  with open(out / 'meta.json') as f:
    meta = json.load(f)
  return Reference(
      checkpoint=out / 'model.safetensors', pth_checkpoint=out / 'model.pth',
      image=data['image'], logits=data['logits'],
      hooks={h: data[f'hook:{h}'] for h in hooks}, num_params=meta['num_params'])


def _randomise_buffers(model, generator) -> None:
  import torch
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
        module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
        module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
        if module.affine:
          module.weight.copy_(1 + 0.1 * torch.randn(module.weight.shape, generator=generator))
          module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
      # timm initialises some weights/biases to exact zeros (heads, LayerScale-free norms):
      # perturb every bias so parity also covers them.
      bias = getattr(module, 'bias', None)
      if isinstance(bias, torch.nn.Parameter) and not isinstance(
          module, torch.nn.modules.batchnorm._BatchNorm):
        bias.add_(0.02 * torch.randn(bias.shape, generator=generator))


def _calibrate_batchnorm(model, x) -> None:
  """Sets every BatchNorm's running stats to those of the (normalised NCHW) batch `x`."""
  import torch
  norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
  momenta = [m.momentum for m in norms]
  for m in norms:
    m.reset_running_stats()
    m.momentum = None  # cumulative average: after one batch, exactly its statistics
  model.train()
  with torch.no_grad():
    model(x)
  for m, momentum in zip(norms, momenta, strict=True):
    m.momentum = momentum
  model.eval()


def _main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument('--model', required=True)
  parser.add_argument('--num_classes', type=int, required=True)
  parser.add_argument('--image_size', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--batch', type=int, default=2)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--kwargs', default='{}')
  parser.add_argument('--hooks', nargs='*', default=[])
  parser.add_argument('--hf_swin', action='store_true')
  parser.add_argument('--calibrate_bn', action='store_true')
  parser.add_argument('--weights_by_order', default='',
                      help='a .pth state dict copied into the model tensor by tensor, in order '
                           '(other names, same shapes), instead of random weights')
  parser.add_argument('--mean_std', type=float, nargs=2, default=None,
                      help='one input mean and std for all channels instead of the cfg ones')
  args = parser.parse_args()

  import torch
  torch.manual_seed(args.seed)
  generator = torch.Generator().manual_seed(args.seed + 1)
  kwargs = json.loads(args.kwargs)
  if args.hf_swin:
    import transformers
    config = transformers.SwinConfig(image_size=args.image_size, num_labels=args.num_classes,
                                     **kwargs)
    model = transformers.SwinForImageClassification(config).eval()
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  else:
    import timm
    model = timm.create_model(args.model, pretrained=False, num_classes=args.num_classes,
                              **kwargs).eval()
    mean, std = model.pretrained_cfg['mean'], model.pretrained_cfg['std']
  if args.weights_by_order:
    loaded = torch.load(args.weights_by_order, map_location='cpu', weights_only=True)
    names = list(model.state_dict())
    assert len(names) == len(loaded), (len(names), len(loaded))
    model.load_state_dict(dict(zip(names, loaded.values(), strict=True)))
  else:
    _randomise_buffers(model, generator)
  if args.mean_std:
    mean, std = (args.mean_std[0],) * 3, (args.mean_std[1],) * 3

  captured = {}
  named = dict(model.named_modules())
  for hook in args.hooks:
    def fn(_m, _i, output, hook=hook):
      output = output[0] if isinstance(output, tuple) else output
      captured[hook] = output.detach().float().numpy()
    named[hook].register_forward_hook(fn)

  rng = np.random.default_rng(args.seed)
  image = rng.uniform(0, 1, (args.batch, args.image_size, args.image_size, 3)).astype(np.float32)
  x = torch.from_numpy(image).permute(0, 3, 1, 2)
  x = (x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
  if args.calibrate_bn:
    _calibrate_batchnorm(model, x)
  with torch.no_grad():
    logits = model(x)
    logits = getattr(logits, 'logits', logits)
  out = pathlib.Path(args.out)
  state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
  from safetensors.torch import save_file
  save_file(state, str(out / 'model.safetensors'))
  torch.save(state, str(out / 'model.pth'))
  np.savez(out / 'reference.npz', image=image, logits=logits.float().numpy(),
           **{f'hook:{h}': v for h, v in captured.items()})
  num_params = sum(p.numel() for p in model.parameters())
  with open(out / 'meta.json', 'w') as f:
    json.dump({'num_params': num_params}, f)


if __name__ == '__main__':
  _main()
