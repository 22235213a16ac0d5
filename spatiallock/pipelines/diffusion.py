"""`SpatialLockPipeline`: caption + layout in, images out, on any base with SD's structure.

The sampling loop is Stable Diffusion's (diffusers `StableDiffusionPipeline`): the same latents, the same
classifier-free guidance, the same scheduler calls. With an adapter attached, the U-Net additionally gets
grounding tokens for the first `grounding_steps` share of the steps; the unconditional branch gets the
empty caption and null grounding (every object slot masked). Without an adapter, or with all gates at zero,
the output is the plain base pipeline's. Training-free layout control, with or without an adapter, is off
unless asked for: cross-attention guidance of the latents (`pipelines.extensions.layout_guidance`) and sampling from a
DDIM-inverted reference image (`spatiallock.pipelines.extensions.layout_init`).

Folders: `save_pretrained` writes diffusers layout (`model_index.json`, `unet/`, `vae/`, `scheduler/`,
`tokenizer/`, `text_encoder/`, `adapter/`). The small base's folder names its text encoder's package instead
of copying it. `from_pretrained(model, adapter=...)` attaches a separately given adapter folder to a base.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import diffusers
import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from spatiallock.base.folders import check_configs, load_base, local_model_path, write_model_folder
from spatiallock.base.text import PhraseCache, encode_captions, is_clip, phrase_dim
from spatiallock.errors import SpatialLockError, first_line
from spatiallock.layout import Layout, as_layouts, excerpt, pad_layouts
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.grounding import GroundingTokens
from spatiallock.models.perception import (
    DownBlocksDone,
    DownBlockTap,
    down_path_only,
    predicted_clean,
    rendered_features,
)
from spatiallock.pipelines.extensions.layout_guidance import make_layout_guidance
from spatiallock.pipelines.extensions.layout_init import initial_latents

# --scheduler names -> diffusers classes (and the options that make them what the name says)
SCHEDULERS = {
    "ddim": ("DDIMScheduler", {}),
    "dpm": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
}


def make_scheduler(name: str, config: dict):
    """A diffusers scheduler by short name (see `SCHEDULERS`), on the noise schedule of `config`."""
    if name not in SCHEDULERS:
        raise SpatialLockError(f"scheduler: {name!r} is not one of {', '.join(SCHEDULERS)}")
    cls_name, options = SCHEDULERS[name]
    return getattr(diffusers, cls_name).from_config(config, **options)


def sampling_scheduler(model: str | os.PathLike, name: str | None = None):
    """The scheduler a model folder names (a training-only `DDPMScheduler` becomes DPM-Solver++), or the one
    `name`d (see `SCHEDULERS`) on the folder's noise schedule."""
    try:
        config = diffusers.DDPMScheduler.load_config(model, subfolder="scheduler")
    except (OSError, ValueError, RecursionError) as err:
        first = first_line(err)[:200]
        raise SpatialLockError(f"model: cannot read the scheduler of {model}: {first}") from None
    where = f"model: {Path(model) / 'scheduler'}"
    class_name = config.get("_class_name", "DDPMScheduler")  # none named: a schedule to sample with DPM-Solver++
    cls = getattr(diffusers, class_name, None) if isinstance(class_name, str) else None
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        raise SpatialLockError(f"{where}: _class_name {excerpt(class_name)} names no diffusers scheduler")
    try:
        sampler = make_scheduler("dpm", config) if cls is diffusers.DDPMScheduler else cls.from_config(config)
        # another sampler on the folder's schedule, as the folder's own scheduler completes it with its defaults
        return sampler if name is None else make_scheduler(name, sampler.config)
    except (ValueError, TypeError, KeyError, NotImplementedError) as err:  # a value the scheduler cannot take
        first = first_line(err)[:200]
        raise SpatialLockError(f"{where}: cannot make the sampler: {first}") from None


@dataclass
class SpatialLockPipelineOutput(BaseOutput):
    """`images`: PIL images, a numpy array or a tensor (by `output_type`); `layouts`: the layout of each."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    layouts: list[Layout]


class SpatialLockPipeline(DiffusionPipeline):
    """Layout-to-image generation with a SpatialLock (or GLIGEN-style) adapter on a frozen base.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the base (Stable Diffusion v1.x or the small base).
        adapter: a `SpatialLockAdapter` for this base, or None for the plain base pipeline.
        caption_tokens: caption length fed to the text encoder (default: the tokenizer's maximum).
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["adapter"]

    def __init__(self, vae, text_encoder, tokenizer, unet, scheduler, adapter=None, caption_tokens: int | None = None):
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, adapter=None
        )
        self.caption_tokens = caption_tokens or tokenizer.model_max_length
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._phrases: PhraseCache | None = None
        self.set_adapter(adapter)

    # ---- building and saving -----------------------------------------------------------------------------

    def set_adapter(self, adapter: SpatialLockAdapter | None) -> None:
        """Attach `adapter` to the U-Net (checked first), replacing any other; None detaches."""
        SpatialLockAdapter.detach(self.unet)
        if adapter is not None:
            expected = phrase_dim(self.text_encoder)
            if adapter.config.phrase_dim != expected:
                raise SpatialLockError(
                    f"adapter does not fit the base: its phrase embeddings are {adapter.config.phrase_dim}-dim, "
                    f"the base's text encoder gives {expected}"
                )
            adapter.attach(self.unet)
            if adapter.dtype != self.unet.dtype:
                adapter.to(dtype=self.unet.dtype)
            adapter.to(self.unet.device).eval().requires_grad_(False)
        self.register_modules(adapter=adapter)

    @property
    def uses_caption_mask(self) -> bool:
        return not is_clip(self.text_encoder)

    @classmethod
    def from_pretrained(
        cls,
        model: str | os.PathLike,
        adapter: str | os.PathLike | SpatialLockAdapter | None = None,
        torch_dtype: torch.dtype = torch.float32,
        scheduler: str | None = None,
    ) -> SpatialLockPipeline:
        """Load a pipeline folder, or a base (SD v1.x folder / hub id, or the small base) plus an adapter.

        `adapter`: an adapter folder (or object) attached to the base; default: the folder's own `adapter/`
        when there is one, else none (the plain base). `scheduler`: a name of `SCHEDULERS` instead of the
        folder's.
        """
        path = local_model_path(model)  # a hub id: its copy in the Hugging Face cache
        if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise SpatialLockError(
                f"model: {model} is an adapter folder, not a model; give its base as the model and this as adapter"
            )
        base = load_base(path, torch_dtype)
        if adapter is None and (path / "adapter" / "config.json").is_file():
            adapter = path / "adapter"
        if adapter is not None and not isinstance(adapter, SpatialLockAdapter):
            adapter = load_adapter(adapter, torch_dtype)
        sampler = sampling_scheduler(path, scheduler)
        return cls(base.vae, base.text_encoder, base.tokenizer, base.unet, sampler, adapter, base.caption_tokens)

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Write the whole pipeline as a diffusers-layout folder (`spatiallock.base.folders.write_model_folder`: a kill
        never leaves a loadable mix of old and new parts). The small base's text encoder is not copied:
        `model_index.json` names its package instead."""
        text_encoder = None if self.uses_caption_mask else self.text_encoder
        return write_model_folder(
            save_directory, self.unet, self.vae, self.scheduler, self.tokenizer, text_encoder, self.adapter,
            self.caption_tokens,
        )  # fmt: skip

    # ---- inputs ------------------------------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption hidden states (B, L, D) and, for sentence encoders, the token mask (B, L)."""
        hidden, mask = encode_captions(self.text_encoder, self.tokenizer, list(captions), self.caption_tokens)
        hidden = hidden.to(self.text_encoder.dtype)
        return hidden, (mask if self.uses_caption_mask else None)

    @torch.no_grad()
    def encode_layouts(self, layouts: Sequence[Layout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Phrase embeddings (B, N, P), boxes (B, N, 4) and slot masks (B, N), padded to the longest layout."""
        if self._phrases is None or self._phrases.text_encoder is not self.text_encoder:
            self._phrases = PhraseCache(self.text_encoder, self.tokenizer)
        slots = max(1, max(len(layout) for layout in layouts))
        phrases, boxes = pad_layouts(layouts, slots)
        embeds, masks = self._phrases(phrases, slots)
        boxes = torch.tensor(boxes, dtype=embeds.dtype, device=embeds.device)
        return embeds, boxes, masks.to(embeds.dtype)

    def prepare_latents(self, batch: int, height: int, width: int, dtype, device, generator, latents=None):
        shape = (batch, self.unet.config.in_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if isinstance(generator, list) and len(generator) != batch:
            raise SpatialLockError(f"generator: {len(generator)} generators for {batch} images")
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        else:
            latents = latents.to(device=device, dtype=dtype)
        return latents * self.scheduler.init_noise_sigma

    def prepare_extra_step_kwargs(self, generator, eta: float) -> dict:
        accepted = set(inspect.signature(self.scheduler.step).parameters)
        kwargs = {}
        if "eta" in accepted:
            kwargs["eta"] = eta
        if "generator" in accepted:
            kwargs["generator"] = generator
        return kwargs

    @property
    def default_grounding_steps(self) -> float:
        """The share of the steps grounded when a call does not say: the adapter config's `grounding_steps`
        (1.0 for an adapter that records none; the plain base has nothing to ground)."""
        return 1.0 if self.adapter is None else float(self.adapter.config.grounding_steps)

    @property
    def default_ground_unconditional(self) -> bool:
        """Whether classifier-free guidance's unconditional rows go through the adapter (with null grounding) when
        a call does not say: the adapter config's `ground_unconditional` (True for one that records none)."""
        return True if self.adapter is None else bool(self.adapter.config.ground_unconditional)

    @property
    def native_size(self) -> int:
        return self.unet.config.sample_size * self.vae_scale_factor

    # ---- sampling ----------------------------------------------------------------------------------------

    def predict(
        self,
        latents: torch.Tensor,
        t: torch.Tensor,
        states: torch.Tensor,
        caption_mask: torch.Tensor | None,
        grounding: GroundingTokens | None,
    ) -> torch.Tensor:
        """One U-Net call on an already expanded batch, with the adapter's grounding when `grounding` is given."""
        if grounding is None or self.adapter is None:
            return self.unet(latents, t, encoder_hidden_states=states, encoder_attention_mask=caption_mask).sample
        output = self.adapter(self.unet, latents, t, states, encoder_attention_mask=caption_mask, grounding=grounding)
        return output.sample

    def _conditioning(self, layouts, guided: bool, ground_unconditional: bool, latent_size, device) -> tuple:
        """Caption states and mask (unconditional rows first when guided), grounding, and the conditional rows'
        slice, caption mask and grounding (for layout guidance and inversion), for `layouts`."""
        batch = len(layouts)
        states, caption_mask = self.encode_prompts([layout.caption for layout in layouts])
        layout_inputs = None
        if self.adapter is not None:
            layout_inputs = [x.to(device) for x in self.encode_layouts(layouts)]
        if guided:
            empty, empty_mask = self.encode_prompts([""] * batch)
            states = torch.cat([empty, states])
            caption_mask = None if caption_mask is None else torch.cat([empty_mask, caption_mask])
            if layout_inputs is not None and ground_unconditional:  # null grounding: every slot masked
                embeds, bxs, masks = layout_inputs
                null = torch.zeros_like(masks)
                layout_inputs = [embeds.repeat(2, 1, 1), bxs.repeat(2, 1, 1), torch.cat([null, masks])]
        grounding = None
        if layout_inputs is not None:
            grounding = self.adapter.encode_grounding(*layout_inputs, latent_size)
            if guided and not ground_unconditional:
                grounding = grounding._replace(rows=slice(batch, None))
        states = states.to(device)
        caption_mask = None if caption_mask is None else caption_mask.to(device)
        cond_rows = slice(batch, None) if guided else slice(None)  # the conditional rows: for guidance and inversion
        cond_mask = None if caption_mask is None else caption_mask[cond_rows]
        cond_grounding = grounding
        if grounding is not None and guided:
            cond_grounding = grounding.select(cond_rows) if ground_unconditional else grounding._replace(rows=None)
        return states, caption_mask, grounding, cond_rows, cond_mask, cond_grounding

    def perception_targets(self, layouts: Sequence[Layout]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The requested layouts as the PoG head's targets: boxes (B, N, 4), class indices (B, N) and masks
        (B, N) of the objects whose label is one of the head's classes (the others are not scored)."""
        names = {name: k for k, name in enumerate(self.adapter.config.class_names)}
        slots = max(1, max(len(layout) for layout in layouts))
        boxes = torch.zeros(len(layouts), slots, 4)
        labels = torch.zeros(len(layouts), slots, dtype=torch.long)
        masks = torch.zeros(len(layouts), slots)
        for b, layout in enumerate(layouts):
            for n, (label, box) in enumerate(zip(layout.labels, layout.boxes)):
                if label in names:
                    boxes[b, n], labels[b, n], masks[b, n] = torch.tensor(box), names[label], 1.0
        return boxes, labels, masks

    @torch.no_grad()
    def score_candidates(self, features: list[torch.Tensor], layouts: Sequence[Layout]) -> torch.Tensor:
        """Per image, how badly the PoG head finds its requested objects, from the U-Net's down-block `features`
        of those images: 1 - the mean over the objects of a class the head knows of the best IoU x score of a
        detection of that class (0 when none). Lower is better."""
        from torchvision.ops import box_iou

        boxes, labels, masks = self.perception_targets(layouts)
        head = self.adapter.perception
        detections = head.detect([f.to(next(head.parameters()).dtype) for f in features], score_threshold=0.05)
        scores = []
        for b, found in enumerate(detections):
            keep = masks[b] > 0.5
            asked, classes = boxes[b, keep], labels[b, keep]
            if not len(asked) or not len(found["boxes"]):
                scores.append(1.0)
                continue
            quality = box_iou(asked, found["boxes"].cpu().float()) * found["scores"].cpu().float()[None]
            quality = quality * (classes[:, None] == found["labels"].cpu()[None])
            scores.append(1.0 - quality.max(dim=1).values.mean().item())
        return torch.tensor(scores)

    def predicted_clean(self, model_input: torch.Tensor, t, prediction: torch.Tensor) -> torch.Tensor:
        """The clean latents a U-Net `prediction` at timestep `t` implies for a (scaled) `model_input`."""
        steps = torch.full((len(model_input),), int(t), dtype=torch.long, device=model_input.device)
        alphas = self.scheduler.alphas_cumprod
        return predicted_clean(alphas, model_input, steps, prediction, self.scheduler.config.prediction_type)

    def candidate_features(self, tapped, model_input, t, noise, states, caption_mask) -> list[torch.Tensor]:
        """What the PoG head scores candidates from: the features tapped from this step's call (`grounded`), or
        the features of the clean latents the step's guided prediction implies, seen without the layout
        (`rendered`: one down pass more)."""
        if self.adapter.config.perception_input != "rendered":
            return tapped
        with torch.no_grad():
            return rendered_features(self.unet, self.predicted_clean(model_input, t, noise), states, caption_mask)

    def down_features(self, sample, t, states, caption_mask, grounding) -> list[torch.Tensor]:
        """The U-Net's down-block features (what the PoG head reads) for a scaled model input, the up path
        never run: the call stops after the last down block."""
        with DownBlockTap(self.unet.down_blocks) as tap, down_path_only(self.unet.down_blocks):
            try:
                self.predict(sample, t, states, caption_mask, grounding)
            except DownBlocksDone:
                pass
        return tap.features

    def perception_guidance(self, latents, t, states, caption_mask, grounding, layouts, scale: float):
        """`latents` moved by `scale` (root mean square per image) down the gradient of the PoG head's detection
        loss against `layouts`; each image's move depends on that image alone."""
        boxes, labels, masks = (x.to(latents.device) for x in self.perception_targets(layouts))
        original = latents
        rendered = self.adapter.config.perception_input == "rendered"
        if rendered:  # the gradient at the clean latents the prediction implies, the prediction held fixed
            model_input = self.scheduler.scale_model_input(latents, t)
            with torch.no_grad():
                prediction = self.predict(model_input, t, states, caption_mask, grounding)
            latents = self.predicted_clean(model_input, t, prediction)
        with torch.enable_grad():
            x = latents.detach().requires_grad_(True)
            if rendered:
                features = rendered_features(self.unet, x, states, caption_mask)
            else:
                model_input = self.scheduler.scale_model_input(x, t)
                features = self.down_features(model_input, t, states, caption_mask, grounding)
            head = self.adapter.perception
            features = [f.to(next(head.parameters()).dtype) for f in features]
            # the head's loss is a mean over the batch's images: times their number, each image's own term
            loss = sum(head.loss(features, boxes, labels, masks).values()) * len(layouts)
            (grad,) = torch.autograd.grad(loss, x)
        rms = grad.float().pow(2).mean(dim=(1, 2, 3), keepdim=True).sqrt().clamp(min=1e-12)
        step = scale * (grad.float() / rms).to(x.dtype)
        # rendered: x_t moves with x0 by a positive factor (the prediction held fixed), and the step is normalised
        return (original - step if rendered else x - step).detach()

    def check_perception_guidance(self, steps: int, scale: float, layouts: Sequence[Layout]) -> None:
        """Refuse, in one line, perception guidance this pipeline or call cannot do."""
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise SpatialLockError(f"perception_guidance_steps: a whole number, 0 or more, got {steps!r}")
        if not (math.isfinite(scale) and scale >= 0):
            raise SpatialLockError(f"perception_guidance_scale: a step size, 0 or more, got {scale!r}")
        if steps:
            self._check_perception(layouts, "perception_guidance_steps")

    def _check_perception(self, layouts: Sequence[Layout], option: str) -> None:
        if self.adapter is None or self.adapter.perception is None:
            raise SpatialLockError(
                f"{option}: needs an adapter with a PoG perception head (variant spatiallock or poi-pog)"
            )
        if not self.adapter.config.class_names:
            raise SpatialLockError(
                f"{option}: the adapter does not record its perception head's class names (class_names in its "
                "config); retrain it, or add them in the order of its training data's categories"
            )
        known = set(self.adapter.config.class_names)
        if not any(label in known for layout in layouts for label in layout.labels):
            raise SpatialLockError(
                f"{option}: no label of the layouts is one of the perception head's classes "
                f"({', '.join(self.adapter.config.class_names[:8])}, ...): nothing to score them by"
            )

    def check_candidates(self, candidates: int, select_at: float, layouts: Sequence[Layout], init: bool) -> None:
        """Refuse, in one line, candidate selection this pipeline or call cannot do."""
        if isinstance(candidates, bool) or not isinstance(candidates, int) or candidates < 1:
            raise SpatialLockError(f"candidates: a whole number, 1 or more, got {candidates!r}")
        if not 0.0 < select_at < 1.0:  # nan fails too
            raise SpatialLockError(f"select_at: a share of the steps in (0, 1), got {select_at}")
        if candidates == 1:
            return
        if init:
            raise SpatialLockError(
                "candidates: not with init_image or init_from_layout (every candidate would start from the same "
                "latents)"
            )
        self._check_perception(layouts, "candidates")

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str] | None = None,
        phrases: Sequence[str] | Sequence[Sequence[str]] | None = None,
        boxes: Sequence | None = None,
        layouts: Sequence[Layout] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 5.0,
        grounding_steps: float | None = None,
        ground_unconditional: bool | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        layout_guidance_steps: int = 0,
        layout_guidance_scale: float = 20.0,
        layout_guidance_iterations: int = 3,
        layout_guidance_layers: str | Sequence[str] | None = None,
        missing_labels: str = "add",
        init_image=None,
        init_from_layout: bool = False,
        init_strength: float = 1.0,
        init_steps: int | None = None,
        candidates: int = 1,
        select_at: float = 0.3,
        perception_guidance_steps: int = 0,
        perception_guidance_scale: float = 0.1,
    ) -> SpatialLockPipelineOutput | tuple:
        """Generate images whose objects sit in their boxes.

        Args:
            prompt: a caption or a list of captions.
            phrases / boxes: each object's label and normalised (x0, y0, x1, y1) box: one list for all prompts
                or one list per prompt (layouts of different sizes in one batch are fine).
            layouts: `Layout`s instead of prompt/phrases/boxes.
            grounding_steps: share of the steps (from the first) with grounding; after it the base runs alone.
                Default: the adapter's own (`default_grounding_steps`).
            ground_unconditional: with classifier-free guidance, whether the unconditional rows go through the
                adapter with null grounding (True, as the adapter was trained with dropped layouts) or are the
                plain base's prediction for the empty caption (False: the adapter runs on the conditional rows
                alone, half its cost, and guidance pushes towards the layout as well as the caption). Default:
                the adapter's own (`default_ground_unconditional`).
            guidance_scale: classifier-free guidance; <= 1 turns it off.
            generator, latents, output_type ("pil", "np", "pt", "latent"), return_dict: as in diffusers.
            layout_guidance_steps: training-free cross-attention guidance (`extensions.layout_guidance`) for this many
                steps from the first; 0 (default) turns it off. Works with or without an adapter.
            layout_guidance_scale: its step size at the first step, decaying linearly over the guided steps.
            layout_guidance_iterations: gradient updates of the latents per guided step.
            layout_guidance_layers: cross-attention layers it reads (default: mid block and first up stage).
            missing_labels: a label absent from its caption is "add"ed to it (with a warning) or an "error".
                The returned layouts hold the captions used.
            init_image / init_from_layout: spatial-aware initialisation (`extensions.layout_init`): start from a
                DDIM-inverted reference image (one for all, or one per image), or from each layout rendered
                as coloured boxes on grey, instead of random noise.
            init_strength: share of the schedule to invert through; sampling runs that share of the steps.
            init_steps: DDIM inversion steps (default: as many as sampling then runs).
            candidates: sample this many candidates per image in one batch (each image's generator draws its
                candidates' noise one after another, so candidate 0 is the image without selection), score
                each with the adapter's PoG head against the requested layout after `select_at` of the steps
                (`score_candidates`: how well its detections find each object in its box, from the U-Net call of
                that step, no extra call) and
                finish only the best; the rest of the steps cost what one image costs. Needs an adapter with a
                PoG head that records its class names; `last_selection` keeps the scores and the choice.
            select_at: the share of the steps, in (0, 1), after which the candidates are scored.
            perception_guidance_steps: for this many steps from the first, move the latents down the gradient of
                the PoG head's detection loss against the requested layout (`perception_guidance`) before the
                U-Net call; the head reads the down blocks only, so the backward pass stops there. Needs what
                `candidates` needs. 0 (default) turns it off.
            perception_guidance_scale: the size of each such move, in latent units: the gradient is normalised
                per image to a root mean square of 1, then scaled by this.
        """
        if layouts is None:
            if prompt is None:
                raise SpatialLockError("prompt: give a prompt (with phrases and boxes) or layouts")
            layouts = as_layouts(prompt, phrases, boxes)
        layouts = [layout for layout in layouts for _ in range(num_images_per_prompt)]
        if grounding_steps is None:
            grounding_steps = self.default_grounding_steps
        if ground_unconditional is None:
            ground_unconditional = self.default_ground_unconditional
        if not 0.0 <= grounding_steps <= 1.0:
            raise SpatialLockError(f"grounding_steps: a share of the steps in [0, 1], got {grounding_steps}")
        for name, value in (("guidance_scale", guidance_scale), ("layout_guidance_scale", layout_guidance_scale)):
            if not math.isfinite(value):  # nan would turn guidance off unnoticed, inf make every pixel nan
                raise SpatialLockError(f"{name}: a finite number, got {value}")
        height = height or self.native_size
        width = width or self.native_size
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale_factor:
                raise SpatialLockError(f"{name}: must be a multiple of {self.vae_scale_factor}, got {value}")
        self.check_candidates(candidates, select_at, layouts, init_image is not None or init_from_layout)
        self.check_perception_guidance(perception_guidance_steps, perception_guidance_scale, layouts)
        self.last_selection = None
        device = self._execution_device
        batch = len(layouts)
        guided = guidance_scale > 1.0
        layout_guidance = None
        if layout_guidance_steps:  # needs every label in its caption: the completed captions are encoded
            layout_guidance, layouts = make_layout_guidance(
                self, layouts, layout_guidance_steps, layout_guidance_scale, layout_guidance_iterations,
                layout_guidance_layers, missing_labels,
            )  # fmt: skip

        # 1. captions (unconditional first, as Stable Diffusion orders them) and grounding tokens, computed once for
        #    every step (with candidates: K rows per layout until the selection, then one)
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        final = self._conditioning(layouts, guided, ground_unconditional, latent_size, device)
        states, caption_mask, grounding, cond_rows, cond_mask, cond_grounding = final
        if candidates > 1:
            expanded = [layout for layout in layouts for _ in range(candidates)]
            conditioning = self._conditioning(expanded, guided, ground_unconditional, latent_size, device)
            states, caption_mask, grounding, cond_rows, cond_mask, cond_grounding = conditioning
            final_guidance, layout_guidance = layout_guidance, layout_guidance and layout_guidance.repeated(candidates)
        current = expanded if candidates > 1 else layouts  # the layouts of the batch's rows
        generators = generator
        if candidates > 1 and isinstance(generator, list):  # a layout's K candidates drawn in turn from its own
            generators = [g for g in generator for _ in range(candidates)]

        # 2. timesteps and noise (or a DDIM-inverted reference image, entered part-way)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        if init_image is not None or init_from_layout:
            if latents is not None:
                raise SpatialLockError("latents: give latents or an init image / init_from_layout, not both")
            latents, start = initial_latents(
                self, layouts, init_image, init_from_layout, states[cond_rows], cond_mask, timesteps, height, width,
                init_strength, init_steps,
            )  # fmt: skip
            timesteps = timesteps[start:]
        else:
            latents = self.prepare_latents(len(current), height, width, states.dtype, device, generators, latents)
        extra = self.prepare_extra_step_kwargs(generators, eta)
        grounded = int(grounding_steps * len(timesteps) + 1e-6)
        select = min(max(1, round(select_at * len(timesteps))), len(timesteps) - 1) if candidates > 1 else None

        # 3. denoising
        with self.progress_bar(total=len(timesteps)) as progress:
            for i, t in enumerate(timesteps):
                if layout_guidance is not None and i < layout_guidance.steps:
                    ground = None if i >= grounded else cond_grounding
                    latents = layout_guidance.update(self, latents, t, i, states[cond_rows], cond_mask, ground)
                if i < perception_guidance_steps:
                    ground = None if i >= grounded else cond_grounding
                    latents = self.perception_guidance(
                        latents, t, states[cond_rows], cond_mask, ground, current, perception_guidance_scale
                    )
                model_input = torch.cat([latents] * 2) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                tapping = i == select and self.adapter.config.perception_input != "rendered"
                with DownBlockTap(self.unet.down_blocks if tapping else []) as tap:
                    noise = self.predict(model_input, t, states, caption_mask, grounding if i < grounded else None)
                if guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                if i == select:  # keep each layout's best candidate by the PoG head, and go on with it alone
                    features = self.candidate_features(
                        [f[cond_rows] for f in tap.features], model_input[cond_rows], t, noise, states[cond_rows],
                        cond_mask,
                    )  # fmt: skip
                    scores = self.score_candidates(features, expanded).view(batch, candidates)
                    keep = (torch.arange(batch) * candidates + scores.argmin(dim=1).cpu()).to(latents.device)
                    self.last_selection = {"scores": scores.cpu(), "kept": (keep % candidates).cpu()}
                    latents, noise = latents[keep], noise[keep]
                    select_scheduler_rows(self.scheduler, keep, batch * candidates)
                    states, caption_mask, grounding, cond_rows, cond_mask, cond_grounding = final
                    layout_guidance, current = final_guidance, layouts
                    extra = self.prepare_extra_step_kwargs(generator, eta)
                latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
                if callback_on_step_end is not None:
                    latents = callback_on_step_end(self, i, t, {"latents": latents}).get("latents", latents)
                progress.update()

        if not torch.isfinite(latents).all():  # would decode to a black image
            raise SpatialLockError(
                "sampling diverged: the latents hold inf or nan (guidance_scale or layout_guidance_scale too large "
                "for this model, or an overflow in half precision)"
            )

        # 4. decoding
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=[True] * batch)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, layouts)
        return SpatialLockPipelineOutput(images=images, layouts=layouts)


def select_scheduler_rows(scheduler, keep: torch.Tensor, rows: int) -> None:
    """Keep the rows `keep` of every per-image tensor a scheduler carries from one step to the next (the previous
    model outputs of a multistep solver, a last sample): those of the shape of a batch of `rows` latents. The
    schedule itself (timesteps, sigmas: one dimension) is the same for every image and stays."""

    def pick(value):
        if torch.is_tensor(value) and value.ndim >= 2 and value.shape[0] == rows:
            return value[keep]
        return value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, list | tuple) and any(torch.is_tensor(v) for v in value):
            setattr(scheduler, name, type(value)(pick(v) for v in value))
        elif torch.is_tensor(value):
            setattr(scheduler, name, pick(value))


def load_adapter(path: str | os.PathLike, torch_dtype: torch.dtype = torch.float32) -> SpatialLockAdapter:
    """An adapter folder (config.json + safetensors); `SpatialLockError` when it is not one."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise SpatialLockError(f"adapter: {path} is not an adapter folder (no config.json)")
    check_configs(path, ["config.json"], "adapter")
    try:
        adapter = SpatialLockAdapter.from_pretrained(path, torch_dtype=torch_dtype, use_safetensors=True)
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as err:
        first = first_line(err)[:200]
        raise SpatialLockError(f"adapter: cannot load {path}: {first}") from None
    return adapter.eval().requires_grad_(False)
