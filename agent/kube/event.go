package kube

import (
	"fmt"
	"unicode/utf8"
)

// MaxEventMessage bounds the message of the Warning Events the agent records on pods. An
// allocation error can carry a cloud response or the caller's input, of any length; every
// Event is stored in etcd and shown by `kubectl describe pod`, where 1 KiB is plenty to say
// what failed. The agent log has the whole error ("allocate failed").
const MaxEventMessage = 1024

// boundEventMessage returns msg, or, when it is longer than MaxEventMessage bytes, its start
// (cut at a character boundary, so the message stays valid UTF-8) followed by a note saying
// it was cut, the whole within MaxEventMessage bytes.
func boundEventMessage(msg string) string {
	if len(msg) <= MaxEventMessage {
		return msg
	}
	note := fmt.Sprintf(" … [cut: %d bytes in all; the agent log has the whole message]", len(msg))
	cut := MaxEventMessage - len(note)
	for cut > 0 && !utf8.RuneStart(msg[cut]) {
		cut--
	}
	return msg[:cut] + note
}
