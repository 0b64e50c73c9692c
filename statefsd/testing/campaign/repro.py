"""Reproduction codes: one string that names exactly one crash state.

``system:workload:seed:model:index:outcome`` for a single cut after trace op
``index`` of the workload run, plus ``:index2:outcome2`` for a second cut
inside the recovery of that state. Outcome codes are the simulated device's
(``Outcome.encode``); none of the parts contains a colon.
"""

from __future__ import annotations

from dataclasses import dataclass

from statefsd.errors import InvalidArgument
from statefsd.testing.simdev import CrashModel, Outcome


@dataclass(frozen=True)
class Code:
    system: str
    workload: str
    seed: int
    model: str
    index: int
    outcome: str
    second: tuple[int, str] | None = None

    def text(self) -> str:
        parts = [self.system, self.workload, str(self.seed), self.model, str(self.index), self.outcome]
        if self.second is not None:
            parts += [str(self.second[0]), self.second[1]]
        return ":".join(parts)

    def first_cut(self) -> "Code":
        return Code(self.system, self.workload, self.seed, self.model, self.index, self.outcome)

    def then(self, index: int, outcome: str) -> "Code":
        return Code(self.system, self.workload, self.seed, self.model, self.index, self.outcome, (index, outcome))

    def command(self) -> str:
        return f"scripts/powerloss-campaign --repro '{self.text()}'"

    @classmethod
    def parse(cls, text: str) -> "Code":
        parts = text.strip().split(":")
        if len(parts) not in (6, 8):
            raise InvalidArgument(f"bad reproduction code {text!r}: expected "
                                  "system:workload:seed:model:index:outcome[:index2:outcome2]")
        try:
            seed, index = int(parts[2]), int(parts[4])
            second = (int(parts[6]), parts[7]) if len(parts) == 8 else None
        except ValueError:
            raise InvalidArgument(f"bad reproduction code {text!r}: seed and indexes are integers") from None
        CrashModel.from_spec(parts[3])          # validate now, with the device's own message
        for outcome in [parts[5]] + ([second[1]] if second else []):
            Outcome.decode(outcome)
        return cls(parts[0], parts[1], seed, parts[3], index, parts[5], second)
