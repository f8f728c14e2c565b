"""Method state shared by several modules, as ``nn.Module`` components (not base classes).

Each component owns its buffers, its update rule and its cross-rank reduction, so the image modules and the
language-model module use the same code without inheriting from each other.
"""

from __future__ import annotations

__all__: list[str] = []
