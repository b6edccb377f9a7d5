"""A custom GX expectation: every feature of a row is a finite number, in one check.

Why: GX spends 25–40 ms building a metric graph per expectation, whatever the row count. The
integrity suite asked three questions of every feature column (not null, a numeric type, between
± the largest finite float) — 192 expectations for the 64 digits features, most of a flow run's
fixed cost. `expect_multicolumn_values_to_be_finite_numbers` asks all three of all features at
once: a row fails if any listed column holds a null, a value that is not a number (text, bool) or
±inf. The verdict is GX's; `data_plane.messages` breaks a failure down per column from the frame,
so the report still names the column, the count and sample values.

GX finds an expectation class by its registered name, so this module must be imported before a
suite naming it is parsed or validated: `data_plane.gx_suite` and `data_plane.gx_run` import it
wherever they touch GX (the flows, the `evergreen` CLI and the S3-shared context all go through
them). A plain GX process
opening `<home>/gx/` needs `import data_plane.gx_expectations` first.
"""

from __future__ import annotations

from typing import Any, ClassVar

import numpy as np
import pandas as pd
from great_expectations.execution_engine.pandas_execution_engine import PandasExecutionEngine
from great_expectations.expectations.expectation import MulticolumnMapExpectation
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_condition_partial import (
    multicolumn_condition_partial,
)
from great_expectations.expectations.metrics.map_metric_provider.multicolumn_map_metric_provider import (
    MulticolumnMapMetricProvider,
)
from great_expectations.render.components import LegacyRendererType, RenderedStringTemplateContent
from great_expectations.render.renderer.renderer import renderer

from data_plane.messages import FINITE_NUMBERS, is_real_number

__all__ = ["FINITE_NUMBERS", "ExpectMulticolumnValuesToBeFiniteNumbers"]


def finite_number_mask(column: pd.Series) -> pd.Series:
    """True where the value is a finite real number: not null, not text, not bool, not ±inf."""
    if pd.api.types.is_bool_dtype(column.dtype):
        return pd.Series(False, index=column.index)
    if pd.api.types.is_numeric_dtype(column.dtype):
        values = column.to_numpy(dtype=float, na_value=np.nan)
        return pd.Series(np.isfinite(values), index=column.index)
    numbers = column.map(is_real_number)
    finite = pd.to_numeric(column.where(numbers), errors="coerce")
    return numbers & pd.Series(
        np.isfinite(finite.to_numpy(dtype=float, na_value=np.nan)), index=column.index
    )


class MulticolumnValuesFiniteNumbers(MulticolumnMapMetricProvider):
    """The row-wise condition: every listed column holds a finite number."""

    condition_metric_name = "multicolumn_values.finite_numbers"
    condition_domain_keys = (
        "batch_id",
        "table",
        "column_list",
        "row_condition",
        "condition_parser",
        "ignore_row_if",
    )

    @multicolumn_condition_partial(engine=PandasExecutionEngine)  # type: ignore[untyped-decorator]
    def _pandas(cls, column_list: pd.DataFrame, **kwargs: Any) -> pd.Series:
        ok = pd.Series(True, index=column_list.index)
        for name in column_list.columns:
            ok &= finite_number_mask(column_list[name])
        return ok


class ExpectMulticolumnValuesToBeFiniteNumbers(MulticolumnMapExpectation):
    """Expect every value in `column_list` to be a finite number (not null, text, bool or ±inf).

    `ignore_row_if` is "never": a row with a missing value is a failing row, not a skipped one.
    """

    map_metric = "multicolumn_values.finite_numbers"
    ignore_row_if: str = "never"  # type: ignore[assignment]
    args_keys: ClassVar[tuple[str, ...]] = ("column_list",)
    library_metadata: ClassVar[dict[str, Any]] = {
        "maturity": "production",
        "tags": ["evergreen", "integrity"],
        "contributors": ["evergreen"],
    }

    @classmethod
    @renderer(renderer_type=LegacyRendererType.PRESCRIPTIVE)
    def _prescriptive_renderer(
        cls, configuration: Any = None, result: Any = None, runtime_configuration: Any = None
    ) -> list[RenderedStringTemplateContent]:
        """The Data Docs line: which columns must hold finite numbers."""
        columns = list((configuration.kwargs if configuration else {}).get("column_list") or [])
        shown = ", ".join(columns[:8]) + (
            f" … ({len(columns)} columns)" if len(columns) > 8 else ""
        )
        template = "Values in every row of $columns must be finite numbers (no null, text or ±inf)."
        return [
            RenderedStringTemplateContent(
                content_block_type="string_template",
                string_template={"template": template, "params": {"columns": shown}},
            )
        ]
