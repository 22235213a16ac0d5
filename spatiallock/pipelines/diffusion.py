"""`SpatialLockPipeline`: caption + layout in, images out, on any base with SD's structure (SD v1.x, SDXL, the
small base).

The denoising loop is Stable Diffusion's (diffusers `StableDiffusionPipeline`): the same latents, classifier-free
guidance and scheduler calls. With an adapter attached, the U-Net also gets grounding tokens for the first
`grounding_steps` share of the steps; the unconditional branch gets the empty caption and null grounding. Without
an adapter, or with all gates at zero, the output is the plain base pipeline's. Everything else is an extension
(`pipelines/extensions/`: layout guidance, layout initialisation, perception guidance, candidate selection), off
unless its arguments switch it on; the base's text conditioning is one replaceable part (`text_conditioning`:
SDXL's two text encoders, pooled embedding and size ids are its SDXL subclass, the loop the same).

Folders: `save_pretrained` writes diffusers layout (`model_index.json`, `unet/`, `vae/`, `scheduler/`,
`tokenizer/`, `text_encoder/`, `adapter/`; the small base names its text encoder's package instead of copying
it). `from_pretrained(model, adapter=...)` attaches a separately given adapter folder to a base.
"""

from __future__ import annotations

import inspect
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from spatiallock.base.folders import load_base, local_model_path, write_model_folder
from spatiallock.base.latents import decode_latents, encode_pixels, image_factor, latent_patch
from spatiallock.base.text import PHRASE_TOKENS, PhraseCache, is_clip, phrase_dim, text_conditioning, warn_cut_texts
from spatiallock.errors import SpatialLockError
from spatiallock.layout import Layout, as_layouts, pad_layouts
from spatiallock.models.adapter import SpatialLockAdapter
from spatiallock.models.grounding import GroundingTokens
from spatiallock.models.perception import DownBlockTap
from spatiallock.pipelines.extensions.base import Conditioning, Extension, SamplingCall, make_extensions
from spatiallock.pipelines.extensions.layout_guidance import LayoutGuidanceExtension as LayoutGuidance
from spatiallock.pipelines.extensions.layout_init import LayoutInit
from spatiallock.pipelines.extensions.perception import CandidateSelection, PerceptionGuidance
from spatiallock.pipelines.loading import folder_kind, load_adapter, sampling_scheduler
from spatiallock.pipelines.protocol import DIFFUSION
from spatiallock.threads import adapt_threads


@dataclass
class SpatialLockPipelineOutput(BaseOutput):
    """`images`: PIL images, a numpy array or a tensor (by `output_type`); `layouts`: the layout of each."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    layouts: list[Layout]


class SpatialLockPipeline(DiffusionPipeline):
    """Layout-to-image generation with a SpatialLock (or GLIGEN-style) adapter on a frozen base.

    Args:
        vae, text_encoder, tokenizer, unet, scheduler: the base (Stable Diffusion v1.x, SDXL or the small base).
        adapter: a `SpatialLockAdapter` for this base, or None for the plain base pipeline.
        caption_tokens: caption length fed to the text encoder (default: the tokenizer's maximum).
        text_encoder_2, tokenizer_2: SDXL's second text encoder (`CLIPTextModelWithProjection`) and its tokenizer;
            with them the text conditioning is SDXL's (`base.text.SDXLTextConditioning`).
        force_zeros_for_empty_prompt: SDXL: classifier-free guidance's unconditional rows are zeros (its default).
    """

    model_cpu_offload_seq = "text_encoder->text_encoder_2->unet->vae"
    _optional_components = ["adapter", "text_encoder_2", "tokenizer_2"]
    kind = DIFFUSION
    # the sampling ideas on top of the denoising loop, in the order the loop calls them (see `extensions.base`)
    extensions: tuple[type[Extension], ...] = (LayoutInit, LayoutGuidance, PerceptionGuidance, CandidateSelection)

    def __init__(
        self, vae, text_encoder, tokenizer, unet, scheduler, adapter=None, caption_tokens: int | None = None,
        text_encoder_2=None, tokenizer_2=None, force_zeros_for_empty_prompt: bool = True,
    ):  # fmt: skip
        super().__init__()
        self.register_modules(
            vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler, adapter=None,
            text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
        )  # fmt: skip
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        # the base family's text conditioning (replaceable: a base with other conditioning sets its own)
        self.text_conditioning = text_conditioning(self)
        self.caption_tokens = caption_tokens or tokenizer.model_max_length
        self.vae_scale_factor = image_factor(vae, unet)  # pixels a U-Net cell: the autoencoder's, times its patch
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)
        self._phrases: PhraseCache | None = None
        self.judge = None
        self.set_adapter(adapter)

    # ---- building and saving -----------------------------------------------------------------------------

    def set_judge(self, judge) -> None:
        """Score candidates and guide perception with `judge` (a frozen image-only detector, e.g.
        `evaluation.reward.ImageJudge`) on the decoded clean estimate instead of the adapter's PoG head; None goes
        back to the head. Not saved with the pipeline."""
        if judge is not None:
            judge = judge.to(self.unet.device).eval().requires_grad_(False)
        self.judge = judge

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
        cls, model: str | os.PathLike, adapter: str | os.PathLike | SpatialLockAdapter | None = None,
        torch_dtype: torch.dtype = torch.float32, scheduler: str | None = None,
    ) -> SpatialLockPipeline:  # fmt: skip
        """Load a pipeline folder, or a base (SD v1.x folder / hub id, or the small base) plus an adapter.

        `adapter`: an adapter folder (or object) attached to the base; default: the folder's own `adapter/`
        when there is one, else none (the plain base). `scheduler`: a name of `SCHEDULERS` instead of the
        folder's.
        """
        path = local_model_path(model)  # a hub id: its copy in the Hugging Face cache
        if path.is_dir() and (path / "config.json").is_file() and not (path / "model_index.json").is_file():
            raise SpatialLockError(f"model: {model} {folder_kind(path / 'config.json')}")
        base = load_base(path, torch_dtype)
        if adapter is None and (path / "adapter" / "config.json").is_file():
            adapter = path / "adapter"
        if adapter is not None and not isinstance(adapter, SpatialLockAdapter):
            adapter = load_adapter(adapter, torch_dtype)
        sampler = sampling_scheduler(path, scheduler)
        return cls(
            base.vae, base.text_encoder, base.tokenizer, base.unet, sampler, adapter, base.caption_tokens,
            base.text_encoder_2, base.tokenizer_2, base.force_zeros_for_empty_prompt,
        )  # fmt: skip

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> Path:
        """Write the whole pipeline as a diffusers-layout folder (`spatiallock.base.folders.write_model_folder`: a kill
        never leaves a loadable mix of old and new parts). The small base's text encoder is not copied:
        `model_index.json` names its package instead."""
        text_encoder = None if self.uses_caption_mask else self.text_encoder
        return write_model_folder(
            save_directory, self.unet, self.vae, self.scheduler, self.tokenizer, text_encoder, self.adapter,
            self.caption_tokens, self.text_encoder_2, self.tokenizer_2, self.force_zeros_for_empty_prompt,
        )  # fmt: skip

    # ---- inputs ------------------------------------------------------------------------------------------

    def encode_prompts(
        self, captions: Sequence[str], size: tuple[int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Caption hidden states (B, L, D) and, for sentence encoders, the token mask (B, L); `size`: the images'
        (height, width), default the native size (SDXL's size ids)."""
        size = size or (self.native_size, self.native_size)
        return self.text_conditioning.encode(self, captions, size)[:2]

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

    @property
    def latent_patch(self) -> int:
        """The side of the autoencoder's latent patch one U-Net cell holds (`base.latents`)."""
        return latent_patch(self.vae, self.unet)

    def encode_pixels(self, pixels: torch.Tensor, how: str = "mean") -> torch.Tensor:
        """Images in [-1, 1] -> the U-Net's scaled latents (the posterior's `how`: \"mean\" or \"mode\")."""
        return encode_pixels(self.vae, self.latent_patch, pixels, how)

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] of `latents`; SDXL's autoencoder decodes in float32 when it asks to (`force_upcast`:
        it overflows in float16), as `StableDiffusionXLPipeline` does."""
        upcast = self.text_encoder_2 is not None and self.vae.dtype == torch.float16 and self.vae.config.force_upcast
        if upcast:
            self.vae.to(dtype=torch.float32)
            latents = latents.float()
        try:
            return decode_latents(self.vae, self.latent_patch, latents)
        finally:
            if upcast:
                self.vae.to(dtype=torch.float16)

    # ---- the protocol of every layout-to-image model (`pipelines.protocol.LayoutPipeline`) --------------------

    def check_options(self, options, layouts: Sequence[Layout]) -> None:
        """Refuse, before anything is generated or written, a size the autoencoder cannot take, more steps than the
        noise schedule has, and what an extension cannot do (guidance layers the U-Net lacks, a caption without one
        of its labels with missing_labels "error", perception the adapter cannot do); warn once when captions or
        labels are longer than the text encoder reads (they are cut)."""
        if options.size is not None and options.size % self.vae_scale_factor:
            raise SpatialLockError(f"--size: must be a multiple of {self.vae_scale_factor}, got {options.size}")
        schedule = self.scheduler.config.num_train_timesteps
        for name in ("steps", "init_steps"):
            value = getattr(options, name)
            if value is not None and value > schedule:
                option = f"--{name.replace('_', '-')}"
                raise SpatialLockError(f"{option}: at most the model's {schedule} noise levels, got {value}")
        warn_cut_texts(self.tokenizer, [layout.caption for layout in layouts], self.caption_tokens, "captions")
        labels = [label for layout in layouts for label in layout.labels]
        warn_cut_texts(self.tokenizer, labels, PHRASE_TOKENS, "labels")
        for extension in self.extensions:
            extension.check_options(self, options, layouts)

    def resolved_options(self, options) -> dict:
        """The scheduler, size and grounding choices a call with `options` actually uses."""
        grounding, unconditional = options.grounding_steps, options.ground_unconditional
        return {
            "scheduler": options.scheduler or type(self.scheduler).__name__, "size": options.size or self.native_size,
            "grounding_steps": self.default_grounding_steps if grounding is None else grounding,
            "ground_unconditional": self.default_ground_unconditional if unconditional is None else unconditional,
        }  # fmt: skip

    def extra_scores(self, layouts: Sequence[Layout], seed: int, per_layout: int) -> dict[str, float]:
        return {}

    # ---- sampling ----------------------------------------------------------------------------------------

    def predict(self, latents, t, states, caption_mask, grounding: GroundingTokens | None, added=None) -> torch.Tensor:
        """One U-Net call on an already expanded batch, with the adapter's grounding when `grounding` is given and
        the base's extra inputs (`added_cond_kwargs`) when it has any."""
        extra = {} if added is None else {"added_cond_kwargs": added}
        if grounding is None or self.adapter is None:
            return self.unet(
                latents, t, encoder_hidden_states=states, encoder_attention_mask=caption_mask, **extra
            ).sample
        output = self.adapter(
            self.unet, latents, t, states, encoder_attention_mask=caption_mask, grounding=grounding, **extra
        )
        return output.sample

    def condition(self, layouts, guided: bool, ground_unconditional: bool, latent_size, device) -> Conditioning:
        """The conditioning of a batch with one row per layout (the unconditional rows first when `guided`, as
        Stable Diffusion orders them): caption states, grounding tokens, and the conditional rows alone."""
        batch = len(layouts)
        size = (latent_size[0] * self.vae_scale_factor, latent_size[1] * self.vae_scale_factor)
        states, caption_mask, added = self.text_conditioning.encode(self, [layout.caption for layout in layouts], size)
        layout_inputs = None
        if self.adapter is not None:
            layout_inputs = [x.to(device) for x in self.encode_layouts(layouts)]
        if guided:
            empty, empty_mask, empty_added = self.text_conditioning.unconditional(self, batch, size)
            states = torch.cat([empty, states])
            caption_mask = None if caption_mask is None else torch.cat([empty_mask, caption_mask])
            added = None if added is None else {k: torch.cat([empty_added[k], v]) for k, v in added.items()}
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
        return Conditioning(states, caption_mask, grounding, cond_rows, cond_mask, cond_grounding, added)

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
        **options,
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
                alone, half its cost). Default: the adapter's own (`default_ground_unconditional`).
            guidance_scale: classifier-free guidance; <= 1 turns it off.
            generator, latents, output_type ("pil", "np", "pt", "latent"), return_dict: as in diffusers.
            options: the arguments of the extensions (`extensions`, each documented in its class), e.g.
                `layout_guidance_steps`, `init_from_layout`, `perception_guidance_steps`, `candidates`; each is
                off at its default.
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
        for name in ("guidance_scale", "layout_guidance_scale"):
            value = guidance_scale if name == "guidance_scale" else options.get(name, 0.0)
            if not math.isfinite(value):  # nan would turn guidance off unnoticed, inf make every pixel nan
                raise SpatialLockError(f"{name}: a finite number, got {value}")
        height = height or self.native_size
        width = width or self.native_size
        for name, value in (("height", height), ("width", width)):
            if value % self.vae_scale_factor:
                raise SpatialLockError(f"{name}: must be a multiple of {self.vae_scale_factor}, got {value}")
        extensions = make_extensions(self, self.extensions, options, layouts)
        self.last_selection = None
        device = self._execution_device
        latent_size = (height // self.vae_scale_factor, width // self.vae_scale_factor)
        call = SamplingCall(
            layouts, guidance_scale > 1.0, guidance_scale, ground_unconditional, height, width, latent_size, device,
            generator, eta, rows=list(layouts), generators=generator, given_latents=latents,
        )  # fmt: skip

        # 1. extensions prepare (complete captions, add rows); captions and grounding tokens, computed once for
        #    every step
        for extension in extensions:
            extension.prepare(self, call)
        call.conditioning = self.condition(call.rows, call.guided, ground_unconditional, latent_size, device)

        # 2. timesteps and noise (or what an extension starts from)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        call.timesteps = self.scheduler.timesteps
        for extension in extensions:
            extension.start(self, call)
        if call.latents is None:
            dtype = call.conditioning.states.dtype
            call.latents = self.prepare_latents(len(call.rows), height, width, dtype, device, call.generators, latents)
        call.extra = self.prepare_extra_step_kwargs(call.generators, eta)
        call.grounded = int(grounding_steps * len(call.timesteps) + 1e-6)

        # 3. denoising
        with self.progress_bar(total=len(call.timesteps)) as progress:
            for i, t in enumerate(call.timesteps):
                if device.type == "cpu":
                    adapt_threads()  # fewer threads while other processes take cores (spatiallock.threads)
                for extension in extensions:
                    extension.before_step(self, call, i, t)
                c = call.conditioning
                model_input = torch.cat([call.latents] * 2) if call.guided else call.latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                tapping = any(extension.taps(self, call, i) for extension in extensions)
                with DownBlockTap(self.unet.down_blocks if tapping else []) as tap:
                    grounding = c.grounding if i < call.grounded else None
                    noise = self.predict(model_input, t, c.states, c.caption_mask, grounding, **c.extra_inputs)
                if call.guided:
                    uncond, cond = noise.chunk(2)
                    noise = uncond + guidance_scale * (cond - uncond)
                for extension in extensions:
                    noise = extension.after_prediction(self, call, i, t, model_input, noise, tap.features)
                call.latents = self.scheduler.step(noise, t, call.latents, **call.extra, return_dict=False)[0]
                if callback_on_step_end is not None:
                    call.latents = callback_on_step_end(self, i, t, {"latents": call.latents}).get(
                        "latents", call.latents
                    )
                progress.update()

        if not torch.isfinite(call.latents).all():  # would decode to a black image
            steps = [name for name in options if name.endswith("_scale") and options[name]]
            raise SpatialLockError(
                f"sampling diverged: the latents hold inf or nan (guidance_scale {guidance_scale:g}"
                + "".join(f", {name} {options[name]:g}" for name in steps)
                + ": one of them too large for this model, or an overflow in half precision)"
            )

        # 4. decoding
        layouts = call.layouts
        if output_type == "latent":
            images = call.latents
        else:
            decoded = self.decode_latents(call.latents)
            images = self.image_processor.postprocess(
                decoded, output_type=output_type, do_denormalize=[True] * len(layouts)
            )
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, layouts)
        return SpatialLockPipelineOutput(images=images, layouts=layouts)
