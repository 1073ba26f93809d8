from pallas_kernels.flash_attention import (  # noqa: F401
    decode_attention_pallas,
    flash_attention_pallas,
)
from pallas_kernels.int8_ragged_dot import (  # noqa: F401
    int8_ragged_dot_pallas,
    int8_ragged_dot_reference,
    quantize_int8,
)
from pallas_kernels.int8_ragged_dot_mgpu import int8_ragged_dot_mgpu  # noqa: F401  (Mosaic GPU)
from pallas_kernels.selective_scan import (  # noqa: F401
    selective_scan_pallas,
    selective_state_update,
    selective_state_update_pallas,
)
