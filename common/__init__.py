"""Host- and guest-neutral pieces of kata-colo: the error hierarchy and its status mapping
(:mod:`common.errors`), the one id rule (:mod:`common.ids`), the guest paths and share tag both
sides agree on (:mod:`common.guest_paths`), libc mount wrappers (:mod:`common.mount`) and the
version (:mod:`common.version`). ``ttrpc/`` and the in-guest agent import only this package
(and the generated protobuf modules); it imports nothing of kata-colo's own."""
