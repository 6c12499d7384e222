"""The models the module offers: every registered model, the default first, and whether it can run here.

The widget fills its model combo box from `model_choices()`: a choice that cannot run is shown disabled with its
`tooltip` saying what to do (install a package through the module's Install dependencies button, reinstall the
extension, or point an environment variable at a checkpoint). Nothing here loads weights or imports torch.
"""

from __future__ import annotations

from dataclasses import dataclass

INSTALL_BUTTON = "Install dependencies"


@dataclass(frozen=True)
class ModelChoice:
    """One entry of the model combo box.

    name: the registry name (what the parameter node stores); label: the text shown; enabled: its weights are here;
    reason: why it is disabled and what to do ("" when enabled); description: what the model is.
    """

    name: str
    label: str
    enabled: bool
    reason: str = ""
    description: str = ""

    @property
    def tooltip(self) -> str:
        """The combo box entry's tooltip: the reason first when disabled, then what the model is."""
        return f"{self.reason}\n\n{self.description}".strip() if self.reason else self.description


def _reason_in_slicer(status) -> str:
    """The registry's reason, with the Slicer way to fix a missing package (the module installs its dependencies)."""
    if status.missing == "package" and status.package:
        return (f"Not available: its weights come from the Python package {status.package}, which is not installed in "
                f"Slicer's Python. Press '{INSTALL_BUTTON}' in this module's panel, then choose the model again.")
    if status.missing == "file" and status.weights_path is not None:
        path = status.weights_path
        return (f"Not available: its weights file {path} is missing from the installed extension. Reinstall the "
                f"SAMUNetSlicer extension (Extensions Manager), or copy {path.name} into {path.parent}.")
    return f"Not available: {status.reason}"


def model_choices() -> list[ModelChoice]:
    """Every registered model, the default first (then in registry order), with availability and reasons."""
    from samunet_core.registry import DEFAULT_MODEL, get_spec, model_statuses

    choices = []
    for status in model_statuses():
        label = status.name + (" (default)" if status.name == DEFAULT_MODEL else "")
        if not status.available:
            label += " - not available"
        choices.append(ModelChoice(status.name, label, status.available,
                                   "" if status.available else _reason_in_slicer(status),
                                   get_spec(status.name).description))
    return choices


def first_enabled(choices: list[ModelChoice], preferred: str | None = None) -> str | None:
    """`preferred` when it is an enabled choice, else the first enabled one (the default model when it can run)."""
    enabled = [c.name for c in choices if c.enabled]
    if preferred in enabled:
        return preferred
    return enabled[0] if enabled else None
