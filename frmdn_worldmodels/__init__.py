"""World-model agents (V-M-C) with a flow-based recurrent mixture density network (FRMDN) memory."""
