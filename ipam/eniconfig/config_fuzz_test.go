package eniconfig

import (
	"reflect"
	"strings"
	"testing"
)

// FuzzParse checks Parse on arbitrary documents: no panic, the same answer (errors and
// warnings word for word, since operators diff them between reloads) on a second run, and
// an accepted config that holds every rule the pool relies on.
func FuzzParse(f *testing.F) {
	f.Add([]byte(terwayExample))
	f.Add([]byte(`{"vswitches":{"z":["vsw-a"]},"security_group":"sg-1","idle_ip_reclaim_after":90}`))
	f.Add([]byte(`{"vswitches":{"":[],"z":["x"]},"eni_tags":{"aliyun-a":"1","acs:b":"2","":"3"},"max_pool_size":-1,"min_pool_size":7}`))
	f.Add([]byte(`{"access_key":"k","vswitches":{"z":["vsw-a"]},"security_groups":["sg-1"],"idle_ip_reclaim_after":1e300}`))
	f.Add([]byte(`[1,2]`))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, warn, err := Parse(data)
		c2, warn2, err2 := Parse(data)
		if !reflect.DeepEqual(c, c2) || !reflect.DeepEqual(warn, warn2) || (err == nil) != (err2 == nil) ||
			(err != nil && err.Error() != err2.Error()) {
			t.Fatalf("Parse is not deterministic on %q:\n%v\n%v", data, err, err2)
		}
		if err != nil {
			return
		}
		if c.MaxPoolSize < 0 || c.MinPoolSize < 0 || c.MinPoolSize > c.MaxPoolSize || c.IPWarmUpSize < 0 {
			t.Fatalf("accepted pool sizes max %d min %d warm-up %d", c.MaxPoolSize, c.MinPoolSize, c.IPWarmUpSize)
		}
		if c.IdleIPReclaimAfter < 0 {
			t.Fatalf("accepted idle_ip_reclaim_after %v", c.IdleIPReclaimAfter)
		}
		if n := len(c.SecurityGroups); n == 0 || n > MaxSecurityGroups {
			t.Fatalf("accepted %d security groups", n)
		}
		if len(c.VSwitches) == 0 {
			t.Fatal("accepted no vSwitches")
		}
		for z, ids := range c.VSwitches {
			if z == "" || len(ids) == 0 {
				t.Fatalf("accepted zone %q with vSwitches %v", z, ids)
			}
			for _, id := range ids {
				if !strings.HasPrefix(id, "vsw-") {
					t.Fatalf("accepted vSwitch %q", id)
				}
			}
		}
		if (c.AccessKey == "") != (c.AccessSecret == "") {
			t.Fatal("accepted only one of access_key and access_secret")
		}
	})
}
