"""The exercise's four rules, in one frozen object that `check`, the search, `best` and the report all read.

An MNIST classifier with fewer than 20,000 parameters, no fully connected layer, trained for at most 20 epochs,
reaching at least 99.4% final-epoch accuracy on the 10,000 test images.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Rules:
    max_params: int = 20_000  # the network must have fewer parameters than this (strict)
    max_epochs: int = 20  # passes over the training set, at most
    target_accuracy: float = 0.994  # final-epoch test accuracy (a fraction), mean over the certification seeds
    fully_connected: bool = False  # no Linear layer, nor a fully connected operation in forward

    def params_rule(self, max_params: int | None = None) -> str:
        return f"fewer than {max_params or self.max_params:,} parameters"

    def fc_rule(self) -> str:
        return "no fully connected layer"

    def epochs_rule(self) -> str:
        return f"at most {self.max_epochs} epochs"

    def accuracy_rule(self, seeds: int, target: float | None = None) -> str:
        return (f"final-epoch test accuracy at least {target or self.target_accuracy:.2%} "
                f"(mean of {seeds} seed{'s' if seeds > 1 else ''})")

    @staticmethod
    def accuracy_text(acc: float, target: float | None) -> str:
        """An accuracy in percent to 0.01 points, or to 0.001 where that rounding would read as the target while the
        figure falls short of it: a mean of 99.397% shown as "99.40%" beside "at least 99.40%: FAIL" reads as a bug."""
        text = f"{acc:.2%}"
        return f"{acc:.3%}" if target is not None and acc < target and text == f"{target:.2%}" else text


RULES = Rules()
