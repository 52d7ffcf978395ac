"""Test package. One guard for every test module (and bench script) that imports it: transformers imports torchaudio
when installed, and a torchaudio wheel beside this CPU torch cannot load, which breaks every
`import transformers.models.*`. So transformers is told torchaudio is absent before any test imports a model."""
import transformers.utils as _tu
import transformers.utils.import_utils as _tiu

_tu.is_torchaudio_available = lambda: False
_tiu.is_torchaudio_available = lambda: False
