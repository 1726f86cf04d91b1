"""The base of every config section: strict pydantic models."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict
from pydantic.fields import FieldInfo

# ``json_schema_extra`` of a setting that decides only how a stage's work is run (actors, batch sizes,
# threads, retries), never what it writes: a stage's fingerprint sees it at its default value, so
# changing it (a bigger cluster, a smaller GPU) leaves a finished stage done.
EXECUTION = {"vfm_execution": True}


def is_execution(info: FieldInfo) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("vfm_execution"))


class Section(BaseModel):
    """A config section. Unknown keys are errors; values are validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, frozen=False)

    def fingerprint_view(self) -> dict[str, Any]:
        """The JSON form the stage fingerprints hash: ``model_dump(mode="json")`` with every
        execution setting (see EXECUTION) at its default, so that the digest of a section whose
        execution settings are all at their defaults is that of its plain dump."""
        return self._execution_at_defaults().model_dump(mode="json")

    def _execution_at_defaults(self) -> Section:
        update: dict[str, Any] = {}
        for name, info in type(self).model_fields.items():
            value = getattr(self, name)
            if is_execution(info):
                update[name] = info.get_default(call_default_factory=True)
            elif isinstance(value, Section):
                update[name] = value._execution_at_defaults()
            elif isinstance(value, list) and any(isinstance(v, Section) for v in value):
                update[name] = [v._execution_at_defaults() if isinstance(v, Section) else v for v in value]
        return self.model_copy(update=update)

    def execution_keys(self, prefix: str = "") -> set[str]:
        """The dotted paths of this section's execution settings (``curate.embed.actors``), as
        ``flatten_config`` names them; those inside lists are not separate keys there, so not here."""
        keys: set[str] = set()
        for name, info in type(self).model_fields.items():
            path = f"{prefix}{name}"
            value = getattr(self, name)
            if is_execution(info):
                keys.add(path)
            elif isinstance(value, Section):
                keys |= value.execution_keys(f"{path}.")
        return keys
