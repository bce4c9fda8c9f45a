"""The dispatch table: op -> {reference, triton, cuda, cpu}. Inputs are validated here, once;
ops are registered with torch.library (namespace `fastdiff`) so torch.compile can trace them."""

from fastdiff.ops._backends import BACKENDS, resolve, status, unavailable_reason
from fastdiff.ops.attention import attention, attention_block, attention_dispatch_info
from fastdiff.ops.group_norm import group_norm
from fastdiff.ops.lincomb import lincomb
from fastdiff.ops.schedule import ScheduleTables, schedule_tables, tables_from_schedule
from fastdiff.ops.threshold import dynamic_threshold

OPS = {"attention": attention, "dynamic_threshold": dynamic_threshold,
       "group_norm": group_norm, "lincomb": lincomb, "schedule_tables": schedule_tables}

__all__ = ["BACKENDS", "OPS", "attention", "attention_block", "attention_dispatch_info",
           "dynamic_threshold", "group_norm", "lincomb", "resolve", "ScheduleTables",
           "schedule_tables", "status", "tables_from_schedule", "unavailable_reason"]
