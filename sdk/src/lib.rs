//! Guest SDK for Asya plugins (see the plugin issue).
