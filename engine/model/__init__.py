"""Model execution: the RWKV-7 forward (rwkv7.py), its matrix products (linear.py), the named recurrent state
(state.py), strategy strings (strategy.py), and the process-level knobs of CPU torch work (threads.py, allocator.py)."""
from engine.model.allocator import tune_malloc
from engine.model.rwkv7 import RWKV7, load_model
from engine.model.state import RNNState
from engine.model.strategy import Strategy, parse_strategy
from engine.model.threads import acall_in_new_thread, call_in_new_thread

__all__ = ["RWKV7", "load_model", "RNNState", "Strategy", "parse_strategy", "tune_malloc", "call_in_new_thread",
           "acall_in_new_thread"]
