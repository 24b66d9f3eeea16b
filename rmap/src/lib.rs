//! nvstack's poison path: "ask the owner on demand" through pluggable reverse maps.
