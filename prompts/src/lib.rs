//! ragway-prompts: the versioned prompt template registry.
//! Built by the prompt-templates issue; nothing is exported yet.
