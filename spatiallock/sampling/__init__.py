"""Sampling for every caller (generate, generate-dataset, evaluate, demo, the page, the benchmarks): the options
table (`options`), which model a name means and how layouts are cut into pipeline calls (`run`).

    options = SamplingOptions(steps=25, guidance=5.0, layout_guidance_steps=10)
    pipe = load_pipeline("default", dtype=options.dtype, scheduler=options.scheduler)
    images, asked, seconds = sample(pipe, layouts, options, per_layout=2)
"""

from spatiallock.pipelines.seeding import batches, image_generator, jobs_of
from spatiallock.sampling.options import OPTIONS, Option, SamplingOptions
from spatiallock.sampling.run import adapter_like, adapter_recipe, load_pipeline, sample, sample_batch, sample_batches

__all__ = [
    "OPTIONS", "Option", "SamplingOptions", "adapter_like", "adapter_recipe", "batches", "image_generator", "jobs_of",
    "load_pipeline", "sample", "sample_batch", "sample_batches",
]  # fmt: skip
