package eniconfig

// Fields lists every eni_conf key tern reads (Terway's spelling), in document order. The Helm
// chart's test uses it to check that its values name every field.
func Fields() []string { return append([]string(nil), knownFields...) }
